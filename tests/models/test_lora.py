"""adapter=lora: the merged weights keep every frozen unit slice bit-identical; the adapter exports in PEFT format."""
import json

import pytest
import torch
from conftest import compose, train_cfg
from safetensors.torch import load_file
from testkit import EXACT, loaded_weights as _loaded_weights, unit_deltas as _unit_deltas

from safety_units.utils.config import instantiate
from safety_units.utils.errors import ConfigError
from safety_units.training.freezing import build_masker
from safety_units.models.loading import build_tiny
from safety_units.training.fit import run_train
from safety_units.units.groups import resolve_units




def _tiny():
    return build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir)


def _assert_frozen_bit_identical(masker, merged, loaded):
    for name, ref in loaded.items():
        cur = merged.get(name, merged["model.embed_tokens.weight"])  # tied lm_head
        if name in masker.frozen_full:
            assert torch.equal(cur, ref), name
        elif name in masker.partial:
            idx, dim = masker.partial[name].frozen_index(), masker.partial[name].dim
            assert torch.equal(cur.index_select(dim, idx), ref.index_select(dim, idx)), name


@pytest.mark.parametrize("strategy,extra", [("esu", []), ("esu_cu", []), ("ru_only", []),
                                            ("train_only", ["freeze.classes=[esu]"])])
def test_lora_keeps_frozen_slices_of_the_merged_weights_bit_identical(unit_map, tmp_path, strategy, extra):
    cfg = train_cfg(tmp_path, *EXACT, "adapter=lora", f"freeze={strategy}", f"freeze.unit_map={unit_map}", *extra)
    summary = run_train(cfg)
    loaded, merged = _loaded_weights(), load_file(tmp_path / "model" / "model.safetensors")
    masker, _ = build_masker(cfg, _tiny().model)
    _assert_frozen_bit_identical(masker, merged, loaded)
    # dW lands on exactly the trainable units: every one of them moved, no other unit did
    model = _tiny().model
    moved = _unit_deltas(model, merged, loaded)
    trains = masker.mode == "train_only"
    assert all(moved[k].equal(masker.selection[k] if trains else ~masker.selection[k]) for k in moved)
    adapted = json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    if trains:  # no adapter outside the unit slices; every non-unit entry (q/k/v, norms, embeddings) as loaded
        assert not any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in adapted)
        unit_params = {s.name for g in resolve_units(model) for s in g.slices}
        assert all(torch.equal(merged.get(n, merged["model.embed_tokens.weight"]), ref)
                   for n, ref in loaded.items() if n not in unit_params)
    else:
        assert len(adapted) == 14  # q/k/v/o/gate/up/down of both layers
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"]
    assert summary["adapter"]["entries"]["held_at_zero"] > 0
    for d in (tmp_path / "model", tmp_path / "model" / "adapter"):
        assert json.loads((d / "freeze_check.json").read_text())["frozen_max_abs_delta"] == 0.0
        assert (d / "unit_map.safetensors").is_file()
        assert (d / f"{'trained' if trains else 'frozen'}_units.safetensors").is_file()


def test_lora_resume_equals_uninterrupted(unit_map, tmp_path):
    common = [*EXACT, "trainer.max_steps=6", "adapter=lora", "freeze=esu_cu", f"freeze.unit_map={unit_map}",
              "callbacks=default", "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    run_train(train_cfg(tmp_path / "a", *common))
    summary = run_train(train_cfg(tmp_path / "b", *common,
                                  f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'step000003.ckpt'}"))
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(tmp_path / "a" / "model" / f), load_file(tmp_path / "b" / "model" / f)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f
    assert summary["frozen_max_abs_delta"] == 0.0


def test_exported_adapter_loads_with_peft_and_matches_the_merged_model(unit_map, tmp_path):
    """A tiny Llama saved as a local HF model (model=hf): PeftModel.from_pretrained(base, model/adapter) gives the
    merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny = _tiny()
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    run = tmp_path / "run"
    run_train(train_cfg(run, *EXACT, "model=hf", f"model.path={base_dir}", "adapter=lora", "adapter.dropout=0.1",
                        "freeze=ru_only", f"freeze.unit_map={unit_map}"))
    config = json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == 16
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "model" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = (m.eval()(input_ids=ids).logits for m in (peft_model, merged, base))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want, before, atol=1e-4)  # the adapter changed the model


def test_lora_with_ddp_spawn_two_processes_keeps_exactness(unit_map, tmp_path):
    cfg = train_cfg(tmp_path, *EXACT, "trainer=ddp_spawn", "adapter=lora", "freeze=esu_cu",
                    f"freeze.unit_map={unit_map}", "trainer.max_steps=3")
    run_train(cfg)
    loaded, merged = _loaded_weights(), load_file(tmp_path / "model" / "model.safetensors")
    masker, _ = build_masker(cfg, _tiny().model)
    _assert_frozen_bit_identical(masker, merged, loaded)
    moved = _unit_deltas(_tiny().model, merged, loaded)
    assert all(moved[k].equal(~masker.selection[k]) for k in moved)
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("overrides,match", [
    (["adapter.rank=0"], r"adapter.rank must be an integer >= 1"),
    (["adapter.dropout=1.5"], r"adapter.dropout must be in \[0, 1\)"),
    (["adapter.target_modules=[qkv_proj]"], r"adapter.target_modules: no module named \['qkv_proj'\]"),
    (["adapter.target_modules=[q_proj,v_proj]", "freeze=ru_only", "freeze.unit_map={map}"], "wholly frozen"),
])
def test_lora_config_errors_name_the_key(unit_map, tmp_path, overrides, match):
    cfg = train_cfg(tmp_path, "adapter=lora", *[o.format(map=unit_map) for o in overrides])
    tiny = _tiny()
    masker, _ = build_masker(cfg, tiny.model)
    with pytest.raises(ConfigError, match=match):
        instantiate(cfg.adapter, "adapter").wrap(tiny.model, masker)
