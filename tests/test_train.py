import csv

import pytest
import torch
from conftest import compose, train_cfg
from transformers import AutoModelForCausalLM

from safety_units.errors import ConfigError, NonFiniteLossError
from safety_units.training import run_train


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_tiny_train_end_to_end_exports_hf_model(tmp_path):
    summary = run_train(train_cfg(tmp_path, "trainer.max_steps=5"))
    assert summary["global_step"] == 5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert "data:" in (tmp_path / "model" / "safety_units_config.yaml").read_text()
    assert len(_losses(tmp_path)) == 5


def test_resume_equals_uninterrupted_run(tmp_path):
    common = ["trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "optim.weight_decay=0.1",
              "optim.lr=1e-3", "callbacks=default", "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    full = tmp_path / "full"
    run_train(train_cfg(full, *common))
    ckpt = full / "checkpoints" / "step000003.ckpt"
    assert ckpt.is_file()
    resumed = tmp_path / "resumed"
    run_train(train_cfg(resumed, *common, f"ckpt_path={ckpt}"))
    a, b = _losses(full), _losses(resumed)
    assert set(b) == {3, 4, 5} and all(a[s] == b[s] for s in b)
    wa = AutoModelForCausalLM.from_pretrained(full / "model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_with_clear_message(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at global step [1-9]") as e:
        run_train(train_cfg(tmp_path, "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.gradient_clip_val=null",
                            "trainer.max_steps=20"))
    assert "last good checkpoint" in str(e.value)


def test_unknown_config_key_is_an_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="batchsize"):
        train_cfg(tmp_path, "data.batchsize=3")


def test_bad_optim_value_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        run_train(train_cfg(tmp_path, "optim.lr=-1"))
