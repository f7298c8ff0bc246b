"""Helpers shared by several test files: the exactness settings of the freezing tests, the tiny model and its loaded
weights, which units moved, a small safety / utility set pair, data sources from keywords, a stand-in for
self-distilled answers, the tiny-model matrix of every dense decoder layout (ARCHS, build_arch), and a few
constants."""
import contextlib
import copy
import json

import pytest
import torch
from conftest import SHARED_DATA, compose

from safety_units.data.sources import Source
from safety_units.models.loading import build_tiny
from safety_units.units.groups import resolve_units

# every step of the exactness tests: decoupled weight decay, accumulation, clipping (the masking pitfalls)
EXACT = ["optim.weight_decay=0.1", "optim.lr=5e-3", "trainer.accumulate_grad_batches=2",
         "trainer.gradient_clip_val=0.5", "trainer.max_steps=4"]
LONG = " ".join(["word"] * 30)  # 30 words: past the judges' minimum length (20) and their 80-character opening
HEADS = {"heads": True}  # units.heads=true: attention heads as units
needs_hft_data = pytest.mark.skipif(not (SHARED_DATA / "hft").is_dir(), reason="needs ../shared/data/hft")


def tiny_model():
    """model=tiny's model, freshly built (the same random weights every call)."""
    return build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir).model


def src(**kw):
    """A data source from its settings as keywords (named `test` unless `name` is given)."""
    return Source.from_config(kw, kw.pop("name", "test") if "name" in kw else "test")


def fake_own_answers(model, tokenizer, examples, cache_dir=None, **kw):
    """Stand-in for the teacher's greedy answers (a tiny random model answers with nothing or noise)."""
    from safety_units.data.pairs import with_response

    return [with_response(ex, f"Sure, here is how to {ex.prompt[:20]}") for ex in examples]


def loaded_weights():
    cache = compose("train", ["model=tiny"]).paths.cache_dir
    return {k: v.clone() for k, v in build_tiny(cache_dir=cache).model.state_dict().items()}


def unit_deltas(model, exported, loaded):
    """Per unit group: which units' parameter slices changed at all, from the exported weights."""
    out = {}
    for g in resolve_units(model):
        moved = torch.zeros(g.n, dtype=torch.bool)
        for sl in g.slices:
            diff = exported[sl.name] != loaded[sl.name]
            moved |= diff.any(dim=1 - sl.dim) if diff.ndim == 2 else diff
        out[g.key] = moved
    return out


MARKER = " Zyzzyva"  # a rare word: its tokens appear only in the safety calibration texts


def write_sets(tmp_path):
    """safety.jsonl (refusals carrying MARKER) and utility.jsonl (benign answers) of 12 rows each, in tmp_path."""
    safety = [{"prompt": f"Harmful request number {i}?", "response": f"No.{MARKER}{MARKER} I refuse{MARKER}."}
              for i in range(12)]
    utility = [{"prompt": f"Benign question number {i}?", "response": f"Sure, the answer is {i * 7} apples."}
               for i in range(12)]
    for name, rows in (("safety", safety), ("utility", utility)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "safety.jsonl", tmp_path / "utility.jsonl"


# The tiny-model matrix of every dense decoder layout (tests/units/test_architectures.py, tests/models/test_lora_*):
# 2 layers, hidden 64, intermediate 128, 4 heads.
VOCAB, HIDDEN, INTER, HEADS_N, HEAD_DIM = 128, 64, 128, 4, 16
BASE = dict(num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS_N,
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
GQA = dict(num_key_value_heads=2)
# arch -> (transformers config class, settings beyond BASE, layers path, head units supported)
ARCHS = {
    "llama": ("LlamaConfig", GQA, "model.layers", True),
    "mistral": ("MistralConfig", GQA, "model.layers", True),
    "qwen2": ("Qwen2Config", GQA, "model.layers", True),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=HEAD_DIM), "model.layers", True),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=HEAD_DIM), "model.layers", True),
    "gemma3_text": ("Gemma3TextConfig", dict(GQA, head_dim=HEAD_DIM), "model.layers", True),
    "olmo2": ("Olmo2Config", GQA, "model.layers", True),
    "granite": ("GraniteConfig", GQA, "model.layers", True),
    "stablelm": ("StableLmConfig", GQA, "model.layers", True),
    "gpt2": ("GPT2Config", dict(n_inner=INTER), "transformer.h", True),  # fused Conv1D c_attn
    "phi3": ("Phi3Config", GQA, "model.layers", True),  # fused gate_up_proj and qkv_proj
    "gpt_neox": ("GPTNeoXConfig", {}, "gpt_neox.layers", True),  # fused, per-head interleaved query_key_value
    "falcon": ("FalconConfig", dict(ffn_hidden_size=INTER), "transformer.h", True),  # fused multi-query q/k/v
    "opt": ("OPTConfig", dict(ffn_dim=INTER, word_embed_proj_dim=HIDDEN), "model.decoder.layers", True),
    "phi": ("PhiConfig", {}, "model.layers", True),
    "my_llama": ("LlamaConfig", GQA, "model.layers", True),  # no table entry: found by structure
    "my_phi3": ("Phi3Config", GQA, "model.layers", True),  # no table entry, fused gate_up_proj found by structure
}


# The MoE layouts (tests/units/test_experts.py): 4 experts, top-2, fused 3-D expert tensors (transformers 5).
EXPERTS_N, TOP_K, MOE_INTER = 4, 2, 32
MOE = dict(GQA, num_experts_per_tok=TOP_K)
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=EXPERTS_N, intermediate_size=MOE_INTER),
                "model.layers", True),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=EXPERTS_N, moe_intermediate_size=MOE_INTER,
                                         head_dim=HEAD_DIM), "model.layers", True),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, num_experts=EXPERTS_N, moe_intermediate_size=MOE_INTER,
                                         shared_expert_intermediate_size=INTER), "model.layers", True),  # + shared
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=EXPERTS_N, intermediate_size=MOE_INTER), "model.layers", True),
    # transposed 3-D tensors, interleaved gate/up pairs, biases, a clamped gate
    "gpt_oss": ("GptOssConfig", dict(MOE, num_local_experts=EXPERTS_N, intermediate_size=MOE_INTER,
                                     head_dim=HEAD_DIM, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 10000.0}),
                "model.layers", True),
    "my_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=EXPERTS_N, moe_intermediate_size=MOE_INTER,
                                      head_dim=HEAD_DIM), "model.layers", True),  # no table entry
}


def tiny_mixtral(tokenizer):
    """A tiny random Mixtral (4 experts of 32 channels, top-2) with `tokenizer`'s vocabulary, seed 0."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MixtralForCausalLM(config)


def build_arch(arch: str, model_type: str | None = None, settings: dict | None = None):
    """A tiny random model of `arch` (a key of ARCHS or MOE_ARCHS; config `settings` on top), built offline from its
    transformers config with seed 0; `my_*` archs (or `model_type`) get a model type with no table entry."""
    import transformers

    config_class, extra, _, _ = ARCHS[arch] if arch in ARCHS else MOE_ARCHS[arch]
    extra = dict(extra, **(settings or {}))
    settings = dict(BASE, **extra)
    if arch == "gpt2":  # GPT-2's own setting names
        settings = dict(n_layer=2, n_embd=HIDDEN, n_head=HEADS_N, n_positions=64, vocab_size=VOCAB, **extra)
    config = getattr(transformers, config_class)(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    if model_type or arch.startswith("my_"):
        model.config.model_type = model_type or arch
    return model


@contextlib.contextmanager
def arch_models(prepare=None, fresh_copy: bool = True):
    """get(arch): each arch's tiny model, built once (then `prepare(model)` if given); a deep copy per call unless
    fresh_copy=False. One torch thread meanwhile: 64-wide matrices gain nothing from two, and on shared cores two
    threads spin-wait on each other."""
    cache, threads = {}, torch.get_num_threads()

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_arch(arch) if prepare is None else prepare(build_arch(arch))
        return copy.deepcopy(cache[arch]) if fresh_copy else cache[arch]
    torch.set_num_threads(1)
    try:
        yield get
    finally:
        torch.set_num_threads(threads)


def masked_adamw_steps(model, masker, steps: int = 3) -> None:
    """A few steps as the LightningModule takes them: AdamW with decoupled weight decay (the masker's on partially
    masked parameters), gradient clipping; dropout on. The masker must be attached."""
    masked = masker.partially_masked_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if id(p) not in masked], "weight_decay": 0.1},
                             {"params": [p for p in trainable if id(p) in masked], "weight_decay": 0.0,
                              "masked_weight_decay": 0.1}], lr=1e-2)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        masker.apply_masked_weight_decay(opt, model)
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)
        opt.step()
