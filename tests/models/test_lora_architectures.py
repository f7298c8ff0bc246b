"""adapter=lora on every decoder layout (safety_units.models.lora): `target_modules=auto` picks each architecture's
decoder projections (Linear, FalconLinear, GPT-2's Conv1D); a few AdamW steps over a frozen random 10% unit set move
the adapters, and the merged weights keep every frozen unit slice bit-identical while every trainable one moves --
fused gate_up_proj rows and Conv1D's transposed weights included. Explicit lists and `peft` defaults resolve as named."""

import pytest
import torch
from testkit import ARCHS, MOE_ARCHS, VOCAB, arch_models, build_arch, masked_adamw_steps
from torch import nn

from safety_units.models.lora import LoraAdapter
from safety_units.units.groups import resolve_units
from safety_units.units.masking import Masker, masks_from_selection
from safety_units.utils.errors import ConfigError

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUTO_TARGETS = {  # what `auto` picks: every projection of the decoder blocks, Llama's names first
    "llama": LLAMA,
    "gpt2": ["c_attn", "c_fc", "c_proj"],  # Conv1D; c_proj is both attn.c_proj and mlp.c_proj
    "phi3": ["o_proj", "down_proj", "gate_up_proj", "qkv_proj"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "falcon": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],  # FalconLinear
    "opt": ["q_proj", "k_proj", "v_proj", "fc1", "fc2", "out_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
# the rest of the unit matrix (tests/testkit.py ARCHS) has Llama's module names, found by table or by structure
AUTO_TARGETS.update({arch: LLAMA for arch in ARCHS if arch not in AUTO_TARGETS and arch != "my_phi3"})
AUTO_TARGETS["my_phi3"] = AUTO_TARGETS["phi3"]
# MoE (MOE_ARCHS): the attention projections and Qwen2-MoE's shared expert; the experts' 3-D tensors are no Linear
# modules -- they train under full fine-tuning, and LoRA leaves them as they are
AUTO_TARGETS.update({arch: LLAMA[:4] for arch in MOE_ARCHS})
AUTO_TARGETS["qwen2_moe"] = LLAMA + ["shared_expert_gate"]


@pytest.fixture(scope="module")
def built():
    """A fresh copy of each arch's tiny model, built once per module."""
    with arch_models() as get:
        yield get


def _esu_cu_like(groups, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random 10% of each group's units (never none, never all)."""
    g = torch.Generator().manual_seed(seed)
    sel = {grp.key: torch.rand(grp.n, generator=g) < 0.1 for grp in groups}
    for v in sel.values():
        v[0], v[1] = True, False
    return sel


def _train_adapters(model, lora_masker, steps: int = 3) -> None:
    """AdamW with (masked) decoupled weight decay and clipping, as the LightningModule steps."""
    lora_masker.attach(model)
    masked_adamw_steps(model, lora_masker, steps)
    lora_masker.detach()


@pytest.mark.parametrize("arch", list(AUTO_TARGETS))
def test_auto_lora_over_a_frozen_unit_set_keeps_the_merged_frozen_slices_bit_identical(arch, built):
    model = built(arch)
    groups = resolve_units(model)
    sel = _esu_cu_like(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masker = Masker(model, *masks_from_selection(model, sel, "freeze"))
    adapter = LoraAdapter(rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same factors in any test order
    model, lora_masker = adapter.wrap(model, masker)
    assert adapter.describe()["target_modules"] == AUTO_TARGETS[arch]
    assert adapter.describe()["targets_from"] == "auto"
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in adapter.modules)
    assert (adapter.transposed == set(adapter.modules)) == (arch == "gpt2")
    _train_adapters(model, lora_masker)
    merged = adapter.merged_state_dict(model.state_dict())
    assert masker.frozen_max_abs_delta(merged) == 0.0 and masker.trainable_changed(merged)
    adapted = {f"{n}.weight" for n in adapter.modules}
    for g in groups:
        for s in g.slices:
            if s.param.ndim != 2 or s.experts > 1:
                assert torch.equal(merged[s.name], before[s.name])  # biases and experts get no adapter
                continue
            assert s.name in adapted, f"{s.name}: a unit slice without an adapter"
            keep = s.entries(~sel[g.key])
            changed = (merged[s.name] != before[s.name]).any(dim=1 - s.dim)
            assert not changed[~keep].any(), f"{s.name}: a frozen entry moved"
            assert changed[keep].all(), f"{s.name}: a trainable entry did not move"
    # the merged weights are what the model with adapters computes (Conv1D's dW transposed as peft applies it)
    fresh = build_arch(arch).eval()
    fresh.load_state_dict(merged)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_an_explicit_list_adapts_exactly_the_named_modules(built):
    adapter = LoraAdapter(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"])
    adapter.wrap(built("llama"))
    assert sorted(adapter.modules) == [f"model.layers.{i}.{m}" for i in (0, 1)
                                       for m in ("mlp.down_proj", "self_attn.q_proj")]
    assert adapter.describe()["target_modules"] == ["q_proj", "down_proj"]
    assert adapter.describe()["targets_from"] == "list"


@pytest.mark.parametrize("arch,expected", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
                                           ("phi3", AUTO_TARGETS["phi3"])])  # peft has no phi3 entry: auto
def test_peft_targets_are_peft_defaults_per_model_type(arch, expected, built):
    adapter = LoraAdapter(rank=4, alpha=8, dropout=0.0, target_modules="peft")
    adapter.wrap(built(arch))
    assert adapter.describe()["target_modules"] == expected


def test_a_linear_subclass_outside_the_whitelist_is_refused(built):
    class ScaledLinear(nn.Linear):  # computes something other than x @ W.T + b
        def forward(self, x):
            return 2 * super().forward(x)

    model = built("llama")
    old = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.down_proj is a ScaledLinear"):
        LoraAdapter(target_modules=["down_proj"]).wrap(model)
    assert "model.layers.0.mlp.down_proj" not in LoraAdapter().candidate_modules(model)  # auto skips it


def test_bad_target_modules_name_the_key():
    with pytest.raises(ConfigError, match=r"adapter.target_modules must be `auto`, `peft` or a non-empty list"):
        LoraAdapter(target_modules=[])
