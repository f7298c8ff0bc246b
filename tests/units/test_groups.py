"""Attention heads as units (units.heads=true): the head slices under grouped-query attention, exact head masks
under freezing, head scores from mask / atp / activation, and unit maps written before heads existed."""

import pytest
import torch
from conftest import FIXTURES, compose, train_cfg
from safetensors.torch import load_file

from safety_units.units.masking import ablate_units
from safety_units.models.loading import build_tiny
from safety_units.training.fit import run_train
from safety_units.units.unit_map import UnitMap, random_units, share_counts
from safety_units.units.groups import resolve_units, unit_counts

HEADS = {"heads": True}


def _tiny():
    return build_tiny(cache_dir=compose("train", ["model=tiny"]).paths.cache_dir).model


def test_a_head_owns_its_q_rows_and_o_columns_and_shares_its_kv_block():
    model = _tiny()  # 4 query heads, 2 key/value heads, head_dim 16
    groups = resolve_units(model, HEADS)
    assert [g.key for g in groups] == ["mlp.0", "head.0", "mlp.1", "head.1"]
    head = groups[1]
    assert (head.n, head.width) == (4, 16)
    by_name = {s.name.rsplit(".", 2)[-2]: s for s in head.slices}
    assert {n: (s.dim, s.width, s.shared) for n, s in by_name.items()} == {
        "o_proj": (1, 16, 1), "q_proj": (0, 16, 1), "k_proj": (0, 16, 2), "v_proj": (0, 16, 2)}
    units = torch.tensor([True, False, True, True])  # heads 0, 2, 3: K/V group 0 = heads 0-1, group 1 = heads 2-3
    assert by_name["q_proj"].entries(units).view(4, 16).all(dim=1).tolist() == [True, False, True, True]
    assert by_name["k_proj"].entries(units, "all").view(2, 16).all(dim=1).tolist() == [False, True]
    assert by_name["k_proj"].entries(units, "any").view(2, 16).all(dim=1).tolist() == [True, True]
    # a shared block's value is split between its heads: the group's total counts once
    per_head = by_name["v_proj"].per_unit(torch.ones(32))
    assert per_head.tolist() == [8.0] * 4 and float(per_head.sum()) == 32.0
    assert unit_counts(groups) == {"mlp": [128, 128], "attn": [], "head": [4, 4]}
    assert unit_counts(resolve_units(model)) == {"mlp": [128, 128], "attn": [64, 64]}  # channel fingerprints as before


def _group_seed(sizes, share):
    """A seed whose trained heads fill one K/V group (both its heads) and leave another group half trained."""
    counts = share_counts(sizes, share, "share")
    for seed in range(200):
        sel = random_units(sizes, counts, seed)
        groups = torch.cat([sel[f"head.{layer}"].view(2, 2).sum(dim=1) for layer in (0, 1)])
        if (groups == 2).any() and (groups == 1).any():
            return seed, sel
    raise AssertionError("no seed found")


@pytest.mark.parametrize("mechanism", ["hook", "forward"])  # forward: the FSDP path (masks in the forward op)
def test_head_masks_are_exact_under_freezing_with_grouped_query_attention(tmp_path, mechanism):
    model = _tiny()
    sizes = {g.key: g.n for g in resolve_units(model, HEADS)}
    seed, planted = _group_seed(sizes, 0.375)  # 3 heads of 8
    cfg = train_cfg(tmp_path, "optim.weight_decay=0.1", "optim.lr=5e-3", "trainer.max_steps=4", "units.heads=true",
                    "freeze=train_only", "freeze.random_share=0.375", f"freeze.seed={seed}",
                    f"freeze.mechanism={mechanism}")
    summary = run_train(cfg)
    exported = load_file(tmp_path / "model" / "model.safetensors")
    loaded = _tiny().state_dict()
    trained = load_file(tmp_path / "model" / "trained_units.safetensors")
    assert all(trained[k].equal(planted[k]) for k in planted) and set(trained) == set(planted)
    assert summary["frozen_max_abs_delta"] == 0.0
    moved_any = full_group = False
    for layer in (0, 1):
        heads = trained[f"head.{layer}"]
        pre = f"model.layers.{layer}.self_attn."
        delta = {p: (exported[pre + p + ".weight"] - loaded[pre + p + ".weight"]).abs() for p in ("q_proj", "k_proj",
                                                                                                     "v_proj", "o_proj")}
        for h in range(4):
            q = delta["q_proj"][16 * h:16 * (h + 1)]
            o = delta["o_proj"][:, 16 * h:16 * (h + 1)]
            if heads[h]:
                moved_any |= bool(q.max() > 0) and bool(o.max() > 0)
            else:  # a frozen head: Delta = 0 in its q rows and o columns ...
                assert float(q.max()) == 0.0 and float(o.max()) == 0.0
        for kv in range(2):  # ... and in the K/V rows it reads, which train only when both heads of the group do
            k = delta["k_proj"][16 * kv:16 * (kv + 1)]
            v = delta["v_proj"][16 * kv:16 * (kv + 1)]
            if heads[2 * kv:2 * kv + 2].all():
                assert float(k.max()) > 0 and float(v.max()) > 0
                full_group = True
            else:
                assert float(k.max()) == 0.0 and float(v.max()) == 0.0
    assert moved_any and full_group


def test_ablating_heads_zeroes_their_slices_and_a_full_groups_kv():
    model = _tiny()
    sel = {g.key: torch.zeros(g.n, dtype=torch.bool) for g in resolve_units(model, HEADS)}
    sel["head.1"][torch.tensor([0, 1, 2])] = True  # K/V group 0 fully, group 1 half
    zeroed = ablate_units(model, sel)
    attn = model.model.layers[1].self_attn.requires_grad_(False)
    assert zeroed["units_zeroed"] == 3
    assert float(attn.o_proj.weight[:, :48].abs().max()) == 0.0 and float(attn.o_proj.weight[:, 48:].abs().min()) > 0
    assert float(attn.q_proj.weight[:48].abs().max()) == 0.0
    assert float(attn.v_proj.weight[:16].abs().max()) == 0.0 and float(attn.v_proj.weight[16:].abs().max()) > 0
    assert zeroed["entries_zeroed"] == 3 * 16 * 64 * 2 + 16 * 64 * 2  # q rows + o columns; one K/V block of k and v


def test_a_unit_map_written_before_heads_existed_still_loads_and_ablates():
    path = FIXTURES / "unit_map_channels_v9a1b3aa_tiny.safetensors"  # written by commit 9a1b3aa's attribute.py
    model = _tiny()
    um = UnitMap.load(path, model=model)  # fingerprint (units per kind) unchanged for channel maps
    assert set(um.keys) == {"mlp.0", "attn.0", "mlp.1", "attn.1"} and um.kinds == ["attn", "mlp"]
    assert "unit_kinds" not in um.metadata  # recorded since heads exist; older maps answer from their keys
    top = um.top("safety", {"mlp": 3, "attn": 2})
    zeroed = ablate_units(model, top)
    assert zeroed["units_zeroed"] == 5 and zeroed["entries_zeroed"] == 3 * 64 * 3 + 2 * 64


@pytest.mark.parametrize("method", ["mask", "atp", "activation"])
def test_head_scorers_write_a_head_map(tmp_path, method):
    from safety_units.attribution.pipeline import run_attribution

    extra = ["scoring.steps=5"] if method == "mask" else []
    cfg = compose("attribute", ["model=tiny", "calibration.nsamples=8", "calibration.max_length=48",
                                "units.heads=true", f"scoring={method}", *extra], output_dir=tmp_path)
    um = UnitMap.load(run_attribution(cfg)["unit_map"], model=_tiny())
    assert set(um.keys) == {"mlp.0", "head.0", "mlp.1", "head.1"}
    assert um.safety["head.0"].shape == (4,) and torch.isfinite(um.safety["head.1"]).all()
    assert um.metadata["unit_names"] == {"heads": True} and set(um.metadata["class_shares"]) == {"mlp", "head"}
    assert um.metadata["fingerprint"]["units"]["head"] == [4, 4]
    assert um.metadata["unit_kinds"] == ["head", "mlp"] == um.kinds
