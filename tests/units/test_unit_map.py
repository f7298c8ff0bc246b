"""The unit map file (safety_units.units.unit_map): a map written before heads existed still loads."""
from conftest import FIXTURES
from testkit import tiny_model as _tiny

from safety_units.units.masking import ablate_units
from safety_units.units.unit_map import UnitMap


def test_a_unit_map_written_before_heads_existed_still_loads_and_ablates():
    path = FIXTURES / "unit_map_channels_v9a1b3aa_tiny.safetensors"  # written by commit 9a1b3aa's attribute.py
    model = _tiny()
    um = UnitMap.load(path, model=model)  # fingerprint (units per kind) unchanged for channel maps
    assert set(um.keys) == {"mlp.0", "attn.0", "mlp.1", "attn.1"} and um.kinds == ["attn", "mlp"]
    assert "unit_kinds" not in um.metadata  # recorded since heads exist; older maps answer from their keys
    top = um.top("safety", {"mlp": 3, "attn": 2})
    zeroed = ablate_units(model, top)
    assert zeroed["units_zeroed"] == 5 and zeroed["entries_zeroed"] == 3 * 64 * 3 + 2 * 64
