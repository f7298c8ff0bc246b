"""Stability of unit sets between maps (IoU, Spearman) and recovery of a planted set, on hand-computed cases."""
import pytest
import torch

from safety_units.units.classification import CLASS_CODES
from safety_units.utils.errors import ConfigError
from conftest import load_script
from safety_units.units.stability import iou, pair_metrics, planted_recovery, spearman
from safety_units.units.unit_map import UnitMap

ESU, RU, CU = CLASS_CODES["esu"], CLASS_CODES["ru"], CLASS_CODES["cu"]


def _map(safety: dict, utility: dict, classes: dict, weight_hash: str = "a") -> UnitMap:
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in safety.items()}
    u = {k: torch.tensor(v, dtype=torch.float32) for k, v in utility.items()}
    c = {k: torch.tensor(v, dtype=torch.uint8) for k, v in classes.items()}
    units = {"mlp": [len(safety["mlp.0"])], "attn": [len(safety["attn.0"])]}
    meta = {"normalization": "per_layer",
            "fingerprint": {"model_type": "llama", "num_layers": 1, "units": units, "weight_hash": weight_hash}}
    return UnitMap(t, u, c, meta)


# One layer: 4 MLP units, 2 attention units; B comes from another model (weights differ).
A = _map({"mlp.0": [1, 2, 3, 4], "attn.0": [5, 6]}, {"mlp.0": [40, 30, 20, 10], "attn.0": [1, 2]},
         {"mlp.0": [CU, CU, ESU, ESU], "attn.0": [RU, CU]})
B = _map({"mlp.0": [1, 2, 4, 3], "attn.0": [6, 5]}, {"mlp.0": [10, 20, 30, 40], "attn.0": [2, 1]},
         {"mlp.0": [RU, ESU, ESU, CU], "attn.0": [RU, CU]}, weight_hash="b")


def test_hand_computed_pair():
    m = pair_metrics(A, B, tops=[0.5])
    assert m["ESU IoU"] == pytest.approx(1 / 3)  # {m2, m3} vs {m1, m2}
    assert m["RU IoU"] == pytest.approx(1 / 2)  # {a0} vs {m0, a0}
    # top half per kind by per-layer rank safety - utility (ties: higher safety rank):
    # A: mlp diffs [-1, -1/3, 1/3, 1] -> {m2, m3}; attn diffs [0, 0] -> a1.  B: mlp [0, 0, 1/3, -1/3] -> {m2, m1};
    # attn [0, 0], safety ranks [1, 0] -> a0.  IoU = |{m2}| / |{m1, m2, m3, a0, a1}|
    assert m["top 0.5 s-u IoU"] == pytest.approx(1 / 5)
    # pooled ranks: safety A 0..5, B [0, 1, 3, 2, 5, 4]: sum d^2 = 4 -> 1 - 6*4/(6*35)
    assert m["rho safety"] == pytest.approx(1 - 24 / 210)
    # utility A ranks [5, 4, 3, 2, 0, 1], B [2, 3, 4, 5, 1, 0]: sum d^2 = 22
    assert m["rho utility"] == pytest.approx(1 - 132 / 210)


def test_a_map_with_itself_is_identical_and_spearman_handles_ties():
    m = pair_metrics(A, A, tops=[0.25, 0.5])
    assert all(v == pytest.approx(1.0) for v in m.values())
    assert spearman({"x": torch.tensor([1.0, 1.0, 2.0])}, {"x": torch.tensor([3.0, 3.0, 5.0])}) == pytest.approx(1.0)
    empty = {"mlp.0": torch.zeros(3, dtype=torch.bool)}
    assert iou(empty, empty) != iou(empty, empty)  # nan: no units in either set


def test_cli_writes_table_and_heatmaps(tmp_path):
    pa, pb = A.save(tmp_path / "a", plot=False), B.save(tmp_path / "b", plot=False)
    text = load_script("stability").main([str(pa), str(pb), str(pa), "--out", str(tmp_path / "out"), "--top", "0.5"])
    assert "| a | b | 0.333 | 0.500 | 0.200 | 0.886 | 0.371 |" in text
    assert "| a | a | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    assert (tmp_path / "out" / "stability.md").read_text() == text
    assert (tmp_path / "out" / "stability.png").stat().st_size > 0


def test_maps_of_another_architecture_are_refused(tmp_path):
    c = _map({"mlp.0": [1, 2, 3], "attn.0": [5, 6]}, {"mlp.0": [1, 2, 3], "attn.0": [1, 2]},
             {"mlp.0": [CU, ESU, RU], "attn.0": [RU, CU]})
    pa, pc = A.save(tmp_path / "a", plot=False), c.save(tmp_path / "c", plot=False)
    with pytest.raises(SystemExit):
        load_script("stability").main([str(pa), str(pc), "--out", str(tmp_path / "out")])
    from safety_units.units.stability import load_maps

    with pytest.raises(ConfigError, match=r"cover different units \(mlp.0: 4 vs 3\)"):
        load_maps([str(pa), str(pc)])


def test_planted_recovery_precision_recall():
    planted = {"mlp.0": torch.tensor([False, True, True, False]), "attn.0": torch.zeros(2, dtype=torch.bool)}
    r = planted_recovery(planted, B)
    # |S| = 2 MLP units. B's safety ranks [0, 1/3, 1, 2/3] -> top-2 {m2, m3}: 1 hit; by safety - utility {m2, m1}: 2
    assert r["safety"] == {"hits": 1, "planted": 2, "precision": 0.5, "recall": 0.5, "chance": 2 / 6}
    assert r["safety_minus_utility"]["hits"] == 2 and r["safety_minus_utility"]["recall"] == 1.0
    with pytest.raises(ConfigError, match="cover different units"):
        planted_recovery({"mlp.0": torch.ones(3, dtype=torch.bool), "attn.0": torch.zeros(2, dtype=torch.bool)}, B)
