"""Which parameter slices make up a unit (safety_units.units.groups): heads under grouped-query attention, exact head
masks under freezing, module names, GPT-2 units."""

import pytest
import torch
from conftest import train_cfg
from safetensors.torch import load_file
from testkit import HEADS, tiny_model as _tiny

from safety_units.training.fit import run_train
from safety_units.units.groups import resolve_units, unit_counts
from safety_units.units.unit_map import random_units, share_counts
from safety_units.utils.errors import ConfigError


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


def test_unknown_module_names_list_what_exists(tiny):
    names = {"layers": "model.layers", "mlp": {"in": ["mlp.w1"], "out": "mlp.down_proj"}, "attn": None}
    with pytest.raises(ConfigError, match="module 'mlp.w1' not found.*mlp.gate_proj"):
        resolve_units(tiny.model, names)
    with pytest.raises(ConfigError, match="not a ModuleList"):
        resolve_units(tiny.model, {"layers": "model.blocks", "mlp": None, "attn": None})


def test_gpt2_style_units():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100))
    groups = resolve_units(model)
    assert [(g.kind, g.n) for g in groups] == [("mlp", 128), ("attn", 32), ("mlp", 128), ("attn", 32)]
    mlp = groups[0]
    dims = {s.name: s.dim for s in mlp.slices}
    assert dims == {"transformer.h.0.mlp.c_proj.weight": 0, "transformer.h.0.mlp.c_fc.weight": 1,
                    "transformer.h.0.mlp.c_fc.bias": 0}
