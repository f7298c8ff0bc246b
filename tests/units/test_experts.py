"""MoE experts as units (safety_units.units.experts, the expert kind of safety_units.units.groups) on tiny random
models of every fused-expert layout (tests/testkit.py MOE_ARCHS: Mixtral, Qwen3-MoE, Qwen2-MoE with its shared
expert, OLMoE, gpt-oss' transposed, interleaved, biased experts, and a model type found by structure): units per
(layer, expert, channel), a tapped forward identical to the model's own, statistics over routed tokens only, exact
freezing under AdamW with weight decay, exact ablation of a planted expert through `ablate.classes=esu`, and the
router option."""

import pytest
import torch
from omegaconf import OmegaConf
from testkit import EXPERTS_N, HEAD_DIM, HEADS, HIDDEN, INTER, MOE_ARCHS, MOE_INTER, VOCAB, arch_models, \
    masked_adamw_steps

from safety_units.attribution.scoring import activation_stats
from safety_units.attribution.selection import ablation_selection
from safety_units.training.freezing import build_masker
from safety_units.units.classification import CLASS_CODES
from safety_units.units.experts import layout
from safety_units.units.groups import resolve_units, router_params, tap, unit_counts
from safety_units.units.layouts import names_for
from safety_units.units.masking import Masker, ablate_units, masks_from_selection
from safety_units.units.slices import ParamSlice
from safety_units.units.unit_map import UnitMap, full_fingerprint
from safety_units.utils.errors import ConfigError

UNITS = EXPERTS_N * MOE_INTER  # expert units per layer


@pytest.fixture(scope="module")
def built():
    with arch_models() as get:
        yield get


def _ids(seed: int = 3, rows: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _experts(model) -> list:
    return [g for g in resolve_units(model) if g.kind == "expert"]


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_an_moe_layer_has_a_unit_per_expert_channel(arch, built):
    model = built(arch)
    groups = resolve_units(model)
    shared = [("mlp.0", INTER)] if arch == "qwen2_moe" else []  # its always-on shared expert is a dense MLP
    assert [(g.key, g.n) for g in groups if g.layer == 0] == shared + [("expert.0", UNITS), ("attn.0", HIDDEN)]
    assert unit_counts(groups)["expert"] == [UNITS, UNITS]
    params = dict(model.named_parameters())
    for g in _experts(model):
        assert g.experts == EXPERTS_N and g.out_weight.name.endswith("experts.down_proj")
        for s in g.slices:
            assert s.param is params[s.name] and s.param.shape[0] == EXPERTS_N and s.experts == EXPERTS_N
            assert s.param.shape[s.dim] == MOE_INTER * s.width * s.parts
    names = names_for(model)
    assert names["expert"]["experts"] == "mlp.experts"
    assert names["expert"]["router"] == ("mlp.router" if arch == "gpt_oss" else "mlp.gate")  # my_moe: by structure
    heads = [g for g in resolve_units(model, HEADS) if g.kind == "head"]
    assert [(g.key, g.n, g.width) for g in heads] == [("head.0", 4, HEAD_DIM), ("head.1", 4, HEAD_DIM)]


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_the_tapped_forward_is_the_models_own_and_comes_off(arch, built):
    model = built(arch).eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        seen = []
        handles = [tap(g, lambda x, tokens, start: seen.append((tokens.numel(), x.shape[-1], start)))
                   for g in _experts(model)]
        out = model(input_ids=ids).logits
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # each token reaches TOP_K experts per layer: 2 layers x 24 tokens x 2 routed rows, MOE_INTER channels each
    assert sum(n for n, _, _ in seen) == 2 * ids.numel() * 2 and {c for _, c, _ in seen} == {MOE_INTER}
    assert {s % MOE_INTER for _, _, s in seen} == {0}
    assert all("forward" not in g.out_module.__dict__ and not hasattr(g.out_module, "_unit_taps")
               for g in _experts(model))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_statistics_count_only_the_scored_tokens_routed_to_each_expert(arch, built):
    model = built(arch).eval()
    ids = _ids(seq=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: not scored
    routed = {}

    def record(module, args, kwargs):  # the experts module's own inputs: flat states, top-k indices
        routed[id(module)] = args[1] if len(args) > 1 else kwargs["top_k_index"]
    groups = _experts(model)
    hooks = [g.out_module.register_forward_pre_hook(record, with_kwargs=True) for g in groups]
    stats = activation_stats(model, groups, [{"input_ids": ids, "attention_mask": mask}], "all", progress=False)
    for h in hooks:
        h.remove()
    scored = mask.reshape(-1).bool()
    for g in groups:
        top_k = routed[id(g.out_module)]
        want = torch.stack([((top_k == e).any(dim=-1) & scored).sum() for e in range(EXPERTS_N)])
        assert torch.equal(stats[g.key].count.view(EXPERTS_N, MOE_INTER), want[:, None].double().expand(-1, MOE_INTER))
    if arch == "mixtral":  # the mean of expert 0's channels, recomputed from its weights on its scored tokens
        g = groups[0]
        with torch.no_grad():
            x = {}
            hook = g.out_module.register_forward_pre_hook(lambda m, a, k: x.update(h=a[0]), with_kwargs=True)
            model(input_ids=ids, attention_mask=mask)
            hook.remove()
            rows = (routed[id(g.out_module)] == 0).any(dim=-1) & scored
            gate, up = torch.nn.functional.linear(x["h"][rows], g.out_module.gate_up_proj[0]).chunk(2, dim=-1)
            want = (torch.nn.functional.silu(gate) * up).double().mean(dim=0)
        torch.testing.assert_close(stats[g.key].mean()[:MOE_INTER], want, rtol=1e-5, atol=1e-6)


def _selection(groups, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random 10% of each group's units, plus every channel of expert 1 in each expert group."""
    g = torch.Generator().manual_seed(seed)
    sel = {grp.key: torch.rand(grp.n, generator=g) < 0.1 for grp in groups}
    for grp in groups:
        sel[grp.key][0], sel[grp.key][-1] = True, False
        if grp.kind == "expert":
            sel[grp.key][MOE_INTER:2 * MOE_INTER] = True
    return sel


def _changed_entries(s, before, after) -> torch.Tensor:
    """Per entry along the slice's unit dims ([experts, entries]): did anything there change?"""
    moved = s.channels_first(before != after)
    return (moved.any(dim=1) if moved.ndim == 2 else moved).view(s.experts, -1)


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_freezing_expert_units_is_exact_and_the_rest_trains(arch, built):
    model = built(arch)
    groups = resolve_units(model)
    sel = _selection(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masker = Masker(model, *masks_from_selection(model, sel, "freeze"))
    masker.attach(model)
    masked_adamw_steps(model, masker)
    masker.detach()
    after = model.state_dict()
    assert masker.frozen_max_abs_delta(after) == 0.0 and masker.trainable_changed(after)
    for g in _experts(model):
        for s in g.slices:
            keep = s.entries(~sel[g.key]).view(s.experts, -1)
            changed = _changed_entries(s, before[s.name], after[s.name])
            assert not changed[~keep].any(), f"{s.name}: a frozen entry moved"
            assert not changed[1].any()  # expert 1: frozen whole
            assert changed[keep].all(), f"{s.name}: a trainable entry did not move"  # decay moves every one
    assert all(not torch.equal(before[n], after[n]) for n in router_params(model))  # units.router=train


def test_the_forward_mechanism_names_the_experts_it_cannot_mask(built):
    model = built("mixtral")
    masker = Masker(model, *masks_from_selection(model, _selection(resolve_units(model)), "freeze"),
                    mechanism="forward")
    with pytest.raises(ConfigError, match="MixtralExperts.*MoE experts"):
        masker.attach(model)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_ablate_classes_esu_zeroes_exactly_a_planted_expert(arch, built, tmp_path):
    """A unit map whose ESU are every channel of expert 2 in layer 1 and two channels of expert 0 in layer 0;
    evaluate.py's ablation path (ablate.classes=[esu]) zeroes exactly their entries, and expert 2 then writes
    nothing for the tokens routed to it."""
    model = built(arch)
    groups = resolve_units(model)
    classes = {g.key: torch.full((g.n,), CLASS_CODES["ru"], dtype=torch.uint8) for g in groups}
    classes["expert.1"][2 * MOE_INTER:3 * MOE_INTER] = CLASS_CODES["esu"]
    classes["expert.0"][[3, 5]] = CLASS_CODES["esu"]
    scores = {k: torch.zeros(v.shape) for k, v in classes.items()}
    UnitMap(scores, {k: v.clone() for k, v in scores.items()}, classes, {"fingerprint": full_fingerprint(model)}).save(tmp_path, plot=False)
    cfg = OmegaConf.create({"ablate": {"unit_map": str(tmp_path / "unit_map.safetensors"), "classes": ["esu"]}})
    sel, what = ablation_selection(cfg, model, None)
    assert what["units"]["expert"]["units"] == MOE_INTER + 2 and what["units"]["attn"]["units"] == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeroed = ablate_units(model, sel)
    after = model.state_dict()
    assert zeroed["units_zeroed"] == MOE_INTER + 2
    unit_params = set()
    for g in _experts(model):
        gone = torch.zeros(EXPERTS_N, MOE_INTER, dtype=torch.bool)
        if g.layer == 1:
            gone[2] = True
        else:
            gone[0, [3, 5]] = True
        for s in g.slices:
            unit_params.add(s.name)
            entries = s.channels_first(after[s.name])
            entries = (entries.abs().sum(dim=1) if entries.ndim == 2 else entries.abs()).view(EXPERTS_N, -1)
            zero = s.entries(gone.flatten()).view(EXPERTS_N, -1)
            assert float(entries[zero].max()) == 0.0
            assert not _changed_entries(s, before[s.name], after[s.name])[~zero].any()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in unit_params)
    seen = []
    g1 = _experts(model)[1]
    handle = tap(g1, lambda x, tokens, start: seen.append(x.abs().max()) if start == 2 * MOE_INTER else None)
    with torch.no_grad():
        model(input_ids=_ids(seq=16))
    handle.remove()
    assert seen and max(float(v) for v in seen) == 0.0  # expert 2's channels are all zero where it is routed


def _router_cfg(router: str, strategy: str = "none"):
    return OmegaConf.create({"freeze": {"strategy": strategy}, "units": {"names": None, "heads": False,
                                                                         "router": router}})


def test_units_router_freeze_keeps_every_router_bit_identical(built):
    model = built("qwen3_moe")
    masker, _ = build_masker(_router_cfg("freeze"), model)
    routers = router_params(model)
    assert routers == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert masker.describe()["router"] == "freeze" and masker.frozen_full == set(routers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masker.attach(model)
    masked_adamw_steps(model, masker)
    masker.detach()
    after = model.state_dict()
    assert masker.frozen_max_abs_delta(after) == 0.0
    assert all(torch.equal(before[n], after[n]) for n in routers)
    assert not torch.equal(before["model.layers.0.mlp.experts.down_proj"], after["model.layers.0.mlp.experts.down_proj"])
    assert build_masker(_router_cfg("train"), built("qwen3_moe"))[0] is None  # freeze=none, routers trained


def test_units_router_errors_name_the_key(built):
    with pytest.raises(ConfigError, match="units.router must be one of"):
        build_masker(_router_cfg("fixed"), built("mixtral"))
    with pytest.raises(ConfigError, match="units.router=freeze: this model has no MoE router"):
        build_masker(_router_cfg("freeze"), built("llama"))


def test_each_layout_names_where_an_experts_channel_sits(built):
    """units.experts.layout: Mixtral's [E, 2I, H] gate rows then up rows; gpt-oss' transposed [E, H, 2I] with
    interleaved gate/up columns and a bias; a norm after each expert is refused by name."""
    mixtral = layout(built("mixtral").model.layers[0].mlp.experts, "mixtral")
    assert mixtral["params"] == {"down_proj": {"dim": 2}, "gate_up_proj": {"dim": 1, "parts": 2, "width": 1}}
    oss = layout(built("gpt_oss").model.layers[0].mlp.experts, "gpt_oss")
    assert oss["params"]["down_proj"] == {"dim": 1} and oss["transposed"] and oss["up_bias"] == "gate_up_proj_bias"
    assert oss["params"]["gate_up_proj"] == {"dim": 2, "parts": 1, "width": 2}
    assert oss["params"]["gate_up_proj_bias"] == {"dim": 1, "parts": 1, "width": 2}
    experts = built("mixtral").model.layers[0].mlp.experts
    experts.has_post_expert_norm = True
    with pytest.raises(ConfigError, match=r"layers\.0: experts with a norm after each expert"):
        layout(experts, "layers.0")


def test_an_expert_slice_maps_units_to_entries_per_expert_and_back():
    """ParamSlice over a [E, 2I, H] tensor with two parts: unit e * I + j owns rows j and I + j of expert e."""
    p = torch.nn.Parameter(torch.zeros(3, 2 * 4, 5))
    s = ParamSlice("w", p, dim=1, parts=2, experts=3)
    units = torch.zeros(12, dtype=torch.bool)
    units[4 + 1] = True  # expert 1, channel 1
    entries = s.entries(units)
    assert entries.shape == (3, 8) and entries.nonzero().tolist() == [[1, 1], [1, 5]]
    values = torch.arange(3 * 8 * 5, dtype=torch.float64).view(3, 8, 5)
    per_unit = s.unit_values(values)
    assert per_unit.shape == (12,) and per_unit[5] == values[1, 1].sum() + values[1, 5].sum()
    assert s.broadcast(entries).shape == (3, 8, 1)
