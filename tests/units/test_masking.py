"""Gradient masks and ablation from a selection (safety_units.units.masking): zeroed slices, heads, masked decay."""
import torch
from testkit import HEADS, tiny_model as _tiny

from safety_units.units.groups import resolve_units
from safety_units.units.masking import Masker, ablate_units, masks_from_selection
from safety_units.units.unit_map import UnitMap


def test_ablation_zeroes_exactly_the_selected_slices(tiny):
    from safety_units.units.groups import resolve_units

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sel = {g.key: torch.zeros(g.n, dtype=torch.bool) for g in resolve_units(tiny.model)}
    sel["mlp.1"][[3, 70]] = True
    sel["attn.0"][5] = True
    zeroed = ablate_units(tiny.model, sel)
    after = tiny.model.state_dict()
    assert zeroed["units_zeroed"] == 3
    expected = {"model.layers.1.mlp.gate_proj.weight": (0, [3, 70]), "model.layers.1.mlp.up_proj.weight": (0, [3, 70]),
                "model.layers.1.mlp.down_proj.weight": (1, [3, 70]), "model.layers.0.self_attn.o_proj.weight": (1, [5])}
    for name, ref in before.items():
        cur = after[name]
        if name in expected:
            dim, idx = expected[name]
            assert (cur.index_select(dim, torch.tensor(idx)) == 0).all()
            keep = torch.ones(ref.shape[dim], dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(cur.index_select(dim, keep.nonzero().flatten()),
                               ref.index_select(dim, keep.nonzero().flatten()))
        else:
            assert torch.equal(cur, ref), name


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


def test_without_masked_decay_adamw_moves_frozen_entries(unit_map, tiny):
    """The reason for the masked decay: hooks alone leave AdamW's decoupled decay on frozen entries."""
    selection = UnitMap.load(unit_map, model=tiny.model).esu_plus_top_cu(0.075)
    partial, full = masks_from_selection(tiny.model, selection, "freeze")
    masker = Masker(tiny.model, partial, full)
    masker.attach(tiny.model)
    opt = torch.optim.AdamW([p for p in tiny.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 1000, (2, 16))
    for _ in range(3):
        opt.zero_grad()
        tiny.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert masker.frozen_max_abs_delta(tiny.model.state_dict()) > 0.0
