"""Units of every dense decoder layout (safety_units.units.groups): one matrix of tiny random models built offline from
each architecture's transformers config (2 layers, hidden 64, intermediate 128, 4 heads). Each arch resolves 2 x (mlp,
attn) groups of the right size, freezes a random unit set exactly under AdamW with weight decay, ablates exactly the
selected slices and gets wifv scores; head units wherever q/k/v are separate. `my_llama` / `my_phi3` are model types
with no table entry (structural detection)."""

import pytest
import torch
from conftest import train_cfg
from testkit import ARCHS, HEAD_DIM, HEADS, HIDDEN, INTER, MOE_ARCHS, VOCAB, arch_models, build_arch as _build, masked_adamw_steps

from safety_units.attribution.one_set import score_units
from safety_units.training.freezing import build_masker
from safety_units.units.groups import resolve_units, unit_counts
from safety_units.units.heads import qkv_index
from safety_units.units.layouts import names_for
from safety_units.units.masking import Masker, ablate_units, masks_from_selection
from safety_units.utils.errors import ConfigError

CASES = [(a, False) for a in ARCHS] + [(a, True) for a, spec in ARCHS.items() if spec[3]]
CASE_IDS = [f"{a}-{'heads' if h else 'channels'}" for a, h in CASES]


@pytest.fixture(scope="module")
def built():
    """A fresh copy of each arch's tiny model; every arch is built once per module."""
    with arch_models() as get:
        yield get


def _names(heads: bool):
    return HEADS if heads else None


def _selection(groups, heads: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random 10% of each group's channels; for heads, one head in layer 0 and a whole K/V group in layer 1."""
    g = torch.Generator().manual_seed(seed)
    sel = {}
    for grp in groups:
        if grp.kind == "head":
            sel[grp.key] = torch.tensor([True, False, False, False] if grp.layer == 0 else [True, True, False, False])
        else:
            sel[grp.key] = torch.rand(grp.n, generator=g) < 0.1
            sel[grp.key][0], sel[grp.key][1] = True, False  # never empty, never full
    return sel


def _expected(s, units: torch.Tensor) -> torch.Tensor:
    """Entry-by-entry reference of ParamSlice.entries(units, "all"): entry e of each part belongs to block
    e // width, whose units are block * shared ... (block + 1) * shared - 1; True when all of them are."""
    per_part = (s.param.shape[s.dim] if s.index is None else len(s.index)) // s.parts
    one = torch.tensor([bool(units[(e // s.width) * s.shared:(e // s.width + 1) * s.shared].all())
                        for e in range(per_part)])
    return torch.cat([one] * s.parts)


def _changed(before: torch.Tensor, after: torch.Tensor, dim: int) -> torch.Tensor:
    """Per index along `dim`: did any entry there change at all?"""
    diff = before != after
    return diff.any(dim=1 - dim) if diff.ndim == 2 else diff


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resolve_units_finds_two_layers_of_mlp_and_attention_units(arch, built):
    model = built(arch)
    groups = resolve_units(model)
    assert [(g.key, g.n) for g in groups] == [("mlp.0", INTER), ("attn.0", HIDDEN), ("mlp.1", INTER),
                                              ("attn.1", HIDDEN)]
    assert unit_counts(groups) == {"mlp": [INTER, INTER], "attn": [HIDDEN, HIDDEN]}
    layers = ARCHS[arch][2]
    for g in groups:
        assert g.out_name.startswith(f"{layers}.{g.layer}.")
        assert len(g.slices) >= (2 if g.kind == "mlp" else 1)  # an MLP unit owns its input rows too
        for s in g.slices:
            assert s.name.startswith(f"{layers}.{g.layer}.") and s.param is dict(model.named_parameters())[s.name]
            assert s.param.shape[s.dim] == g.n * s.width * s.parts // s.shared
    assert names_for(model)["layers"] == layers
    heads = resolve_units(model, HEADS)
    assert [(g.key, g.n, g.width) for g in heads if g.kind == "head"] == [("head.0", 4, HEAD_DIM), ("head.1", 4, HEAD_DIM)]
    qkv = {}  # a fused q/k/v's three slices cover its rows exactly once
    for s in (s for g in heads if g.kind == "head" and g.layer == 0 for s in g.slices if s.index is not None):
        qkv.setdefault(s.name, (s.param.shape[s.dim], []))[1].append(s.index)
    for size, parts in qkv.values():
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(size))
    no_heads = {k: v for k, v in names_for(model).items() if k != "head"}
    with pytest.raises(ConfigError, match="needs the attention's q/k/v projections"):
        resolve_units(model, dict(no_heads, heads=True))


@pytest.mark.parametrize("mechanism", ["hook", "forward"])  # forward: the FSDP path (masks inside the module's op)
@pytest.mark.parametrize("arch,heads", CASES, ids=CASE_IDS)
def test_freezing_a_random_unit_set_is_exact_and_the_rest_trains(arch, heads, mechanism, built):
    model = built(arch)
    groups = resolve_units(model, _names(heads))
    sel = _selection(groups, heads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial, full = masks_from_selection(model, sel, "freeze", _names(heads))
    masker = Masker(model, partial, full, mechanism=mechanism)
    masker.attach(model)
    masked_adamw_steps(model, masker)
    masker.detach()
    after = model.state_dict()
    assert masker.frozen_max_abs_delta(after) == 0.0 and masker.trainable_changed(after)
    for g in groups:
        for s in g.slices:
            keep = _expected(s, ~sel[g.key])  # trainable entries: every unit of their block trains
            changed = _changed(s.region(before[s.name]), s.region(after[s.name]), s.dim)
            assert not changed[~keep].any(), f"{s.name}: a frozen entry moved"
            if s.param.ndim == 2:  # weight decay moves every trainable weight entry
                assert changed[keep].all(), f"{s.name}: a trainable entry did not move"


@pytest.mark.parametrize("arch,heads", CASES, ids=CASE_IDS)
def test_ablation_zeroes_exactly_the_selected_slices(arch, heads, built):
    model = built(arch)
    groups = resolve_units(model, _names(heads))
    sel = _selection(groups, heads, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeroed = ablate_units(model, sel, _names(heads))
    after = model.state_dict()
    assert zeroed["units_zeroed"] == sum(int(v.sum()) for v in sel.values())
    seen = set()
    for g in groups:
        for s in g.slices:
            seen.add(s.name)
            ref, now = s.region(before[s.name]), s.region(after[s.name])
            zero = _expected(s, sel[g.key]) & s.ablate  # q/k rows under a norm over every head stay (OLMo-2)
            gone, kept = zero.nonzero().flatten(), (~zero).nonzero().flatten()
            assert len(gone) or s.shared > 1 or not s.ablate  # a K/V block goes only with every head of its group
            assert not len(gone) or float(now.index_select(s.dim, gone).abs().max()) == 0.0
            assert torch.equal(now.index_select(s.dim, kept), ref.index_select(s.dim, kept))
    assert all(torch.equal(after[k], before[k]) for k in before if k not in seen)


@pytest.mark.parametrize("arch,heads", CASES, ids=CASE_IDS)
def test_wifv_scores_every_unit(arch, heads, built):
    model = built(arch)
    groups = resolve_units(model, _names(heads))
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    scores = score_units(model, groups, [batch], "wifv", progress=False)
    assert list(scores) == [g.key for g in groups]
    for g in groups:
        assert scores[g.key].shape == (g.n,) and torch.isfinite(scores[g.key]).all()
        assert (scores[g.key] >= 0).all() and (scores[g.key] > 0).sum() > g.n // 2


def test_a_phi3_unit_owns_row_j_of_both_halves_of_the_fused_gate_up_proj(built):
    model = built("phi3")
    mlp = resolve_units(model)[0]
    fused = next(s for s in mlp.slices if s.name.endswith("gate_up_proj.weight"))
    assert (fused.dim, fused.parts, fused.param.shape[0]) == (0, 2, 2 * INTER)
    unit = torch.zeros(INTER, dtype=torch.bool)
    unit[5] = True
    assert fused.entries(unit).nonzero().flatten().tolist() == [5, INTER + 5]  # gate row 5, up row 5
    assert fused.per_unit(torch.arange(2.0 * INTER))[5] == 5 + INTER + 5
    w = model.model.layers[0].mlp.gate_up_proj.weight
    before = w.detach().clone()
    ablate_units(model, {g.key: (unit if g.key == "mlp.0" else torch.zeros(g.n, dtype=torch.bool))
                         for g in resolve_units(model)})
    changed = _changed(before, w.detach(), 0)
    assert changed.nonzero().flatten().tolist() == [5, INTER + 5] and float(w.detach()[[5, INTER + 5]].abs().max()) == 0.0


def test_a_model_type_without_a_table_entry_gets_the_names_its_layout_has(built):
    detected = names_for(built("my_llama"))
    assert detected["mlp"] == {"in": ["mlp.gate_proj", "mlp.up_proj"], "out": "mlp.down_proj"}
    assert detected["attn"]["out"] == "self_attn.o_proj" and detected["head"]["q"] == ["self_attn.q_proj"]
    phi3 = names_for(built("my_phi3"))
    assert phi3["mlp"]["in"] == ["mlp.gate_up_proj"] and phi3["head"] == {"qkv": "self_attn.qkv_proj",
                                                                          "layout": "split", "out": "self_attn.o_proj"}
    with pytest.raises(ConfigError, match=r"model_type='my_neox'.*no Llama-style layout.*gpt_neox\.layers\.0\.mlp"):
        resolve_units(_build("gpt_neox", "my_neox"))


def test_an_input_projection_that_is_no_multiple_of_the_units_is_refused(built):
    names = {"layers": "model.layers", "mlp": {"in": ["self_attn.k_proj"], "out": "mlp.down_proj"}, "attn": None}
    with pytest.raises(ConfigError, match=r"k_proj has 32 output channels but mlp.down_proj has 128 input channels"):
        resolve_units(built("llama"), names)


def test_freeze_layers_finds_blocks_that_hold_their_projections_directly(built, tmp_path):
    """OPT's fc1 / fc2 sit in the block itself (model.decoder.layers.1.fc2): freeze=layers still finds layer 1."""
    model = built("opt")
    masker, _ = build_masker(train_cfg(tmp_path, "freeze=layers", "freeze.layers=[1]"), model)
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.decoder.layers.1.")}
    assert expected and masker.frozen_full == expected


def test_snip_sums_a_fused_units_entries_over_both_halves(built):
    """ParamSlice.per_unit on a real scorer: unit j's SNIP score counts gate row j, up row j and down column j."""
    model = built("phi3").eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    scores = score_units(model, resolve_units(model), [batch], "snip", progress=False, gradient_checkpointing=False)
    model.zero_grad()
    model(**batch).loss.backward()
    mlp = model.model.layers[1].mlp
    fused = (mlp.gate_up_proj.weight * mlp.gate_up_proj.weight.grad).abs().sum(dim=1)
    down = (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(dim=0)
    torch.testing.assert_close(scores["mlp.1"], (fused[:INTER] + fused[INTER:] + down).detach(), rtol=1e-4, atol=1e-9)


def test_the_docs_support_table_lists_exactly_this_matrix():
    """docs/architectures.md's table: one row per architecture of the matrix (plus the structural-detection row),
    head units marked yes exactly where the matrix runs head cases."""
    from conftest import ROOT

    rows = [line.split("|")[1:-1] for line in (ROOT / "docs" / "architectures.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| model_type") and not line.startswith("|---")]
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}
    matrix = ARCHS | MOE_ARCHS
    named = {a for a in matrix if not a.startswith("my_")}
    assert set(table) == named | {"any other type with a Llama layout", "any other type with fused experts"}
    for arch in named:
        units, experts, heads, lora = table[arch][:4]
        assert units.startswith("yes") and lora.startswith("yes"), arch
        assert experts.startswith("yes" if arch in MOE_ARCHS else "no"), arch
        assert heads.startswith("yes" if matrix[arch][3] else "no"), arch


def test_fused_qkv_layouts_place_each_heads_rows():
    """units.heads.qkv_index, 4 heads of width 2, 2 key/value heads where grouped: split (q | k | v), per head
    (q k v of head 0, then head 1 ...), grouped (per key/value head: its 2 heads' q, then its k and v)."""
    q, k, v = qkv_index("split", 4, 2, 2)
    assert q.tolist() == list(range(8)) and k.tolist() == [8, 9, 10, 11] and v.tolist() == [12, 13, 14, 15]
    q, k, v = qkv_index("per_head", 4, 4, 2)
    assert q.tolist() == [0, 1, 6, 7, 12, 13, 18, 19] and k.tolist() == [2, 3, 8, 9, 14, 15, 20, 21]
    assert v.tolist() == [4, 5, 10, 11, 16, 17, 22, 23]
    q, k, v = qkv_index("grouped", 4, 2, 2)
    assert q.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and k.tolist() == [4, 5, 12, 13] and v.tolist() == [6, 7, 14, 15]
