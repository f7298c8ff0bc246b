"""What the post-hoc defenses share (safety_units.defenses.posthoc): the target weights of plain, LoRA and PEFT models,
and the callback that snapshots W_aligned at setup and edits the weights at the end of training (shown with
Antidote), refusing sharded strategies."""

from types import SimpleNamespace

import pytest
import torch
from defense_kit import antidote_settings, merged_delta, train_b

from safety_units.defenses.antidote import Antidote, antidote_prune, input_norms, n_pruned
from safety_units.defenses.posthoc import target_weights
from safety_units.utils.errors import ConfigError


def test_target_weights_names_plain_lora_and_peft_models_alike(tiny):
    from peft import LoraConfig, get_peft_model

    names = sorted(target_weights(tiny.model))
    assert len(names) == 14 and "model.layers.1.mlp.down_proj.weight" in names
    peft = get_peft_model(tiny.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert sorted(target_weights(peft)) == names


def test_callback_snapshots_at_setup_applies_at_train_end_and_refuses_sharding(tiny, tokenizer, tmp_path):
    from safety_units.models.lora import LoraAdapter

    loaded = {n: m.weight.detach().clone() for n, m in target_weights(tiny.model).items()}
    model, _ = LoraAdapter(rank=4, alpha=8, dropout=0.0).wrap(tiny.model)
    module = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    trainer = SimpleNamespace(strategy=SimpleNamespace(), is_global_zero=True, loggers=[], global_step=3)
    cb = Antidote(**antidote_settings(tmp_path), granularity="matrix")  # the merged update: antidote_prune below
    assert cb.callbacks(tokenizer) == [cb]
    cb.setup(trainer, module, "fit")
    assert sorted(cb.start) == sorted(loaded) and all(torch.equal(cb.start[n], loaded[n]) for n in loaded)
    train_b(model)
    expect, _ = antidote_prune(merged_delta(model, loaded),
                               input_norms(model, cb.calibration_batches(tokenizer)), 0.1, "matrix")
    cb.on_train_end(trainer, module)
    assert cb.report["defense"] == "antidote" and cb.report["n_pruned"] == sum(n_pruned(e.numel(), 0.1)
                                                                               for e in expect.values())
    after = merged_delta(model, loaded)
    assert all(torch.allclose(after[n], expect[n], atol=1e-6) for n in expect)
    assert cb.summary() == {"name": "antidote", "stage": "post", "report": cb.report}  # what fit records

    class FSDPStrategy:
        pass

    sharded = SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True)
    with pytest.raises(ConfigError, match="FSDPStrategy"):
        Antidote(**antidote_settings(tmp_path)).setup(sharded, module, "fit")
