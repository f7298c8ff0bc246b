"""Unit classes from scores (safety_units.units.classification): shares, ties, set_difference, bad settings."""

import json

import pytest
import torch
from conftest import compose

from safety_units.attribution.pipeline import run_attribution
from safety_units.units.classification import (
    CLASS_CODES,
    CLASS_NAMES,
    classify,
    classify_from_config,
    classify_set_difference,
    percentile_ranks,
)
from safety_units.utils.errors import ConfigError

ESU, EUU, CU, RU = (CLASS_CODES[c] for c in ("esu", "euu", "cu", "ru"))


def _pattern():
    """Ten units of one layer; safety descends with position, utility is a fixed permutation."""
    safety = torch.arange(10, 0, -1).float()                        # unit 0 highest ... unit 9 lowest
    utility = torch.tensor([9, 1, 2, 8, 10, 7, 3, 6, 4, 5]).float()  # unit 4 highest, unit 1 lowest
    return {"mlp.0": safety}, {"mlp.0": utility}


def _members(cls, code):
    return set(torch.nonzero(cls["mlp.0"] == code).flatten().tolist())


def test_constructed_scores_give_the_expected_sets():
    s, u = _pattern()
    cls = classify_set_difference(s, u, top_safety=0.3, top_utility=0.2, bottom=0.4)
    # S = {0, 1, 2} (top 3 by safety), U = {4, 0} (top 2 by utility)
    assert _members(cls, ESU) == {1, 2}
    assert _members(cls, EUU) == {4}
    # bottom 4 by safety: {6, 7, 8, 9}; by utility: {1, 2, 6, 8}; both: {6, 8}
    assert _members(cls, RU) == {6, 8}
    assert _members(cls, CU) == {0, 3, 5, 7, 9}  # in both top sets (0), or in neither top nor bottom-both


def test_class_sizes_are_an_outcome_of_p_and_q():
    g = torch.Generator().manual_seed(0)
    s = {f"mlp.{i}": torch.rand(500, generator=g) for i in range(2)}
    u = {k: 0.5 * v + 0.5 * torch.rand(500, generator=g) for k, v in s.items()}  # correlated, as in real models
    sizes = {}
    for p, q in ((0.05, 0.05), (0.10, 0.05), (0.05, 0.20)):
        cls = classify_from_config(s, u, {"method": "set_difference", "top_safety": p, "top_utility": q,
                                          "bottom": 0.2, "normalization": "per_layer"})
        c = torch.cat(list(cls.values()))
        assert c.numel() == 1000 and set(c.unique().tolist()) <= set(CLASS_NAMES)  # one class per unit
        sizes[p, q] = {name: int((c == code).sum()) for name, code in CLASS_CODES.items()}
        # ESU + (S and U) = top-p: the share removed by the utility set is what the scores say, not a target
        both = sum(int(((s[k].argsort().argsort() >= 500 * (1 - p)) & (u[k].argsort().argsort() >= 500 * (1 - q)))
                       .sum()) for k in s)
        assert sizes[p, q]["esu"] == 2 * round(500 * p) - both
    assert sizes[0.10, 0.05]["esu"] > sizes[0.05, 0.05]["esu"]
    assert sizes[0.05, 0.20]["esu"] < sizes[0.05, 0.05]["esu"] and sizes[0.05, 0.20]["euu"] > sizes[0.05, 0.05]["euu"]


def test_ties_are_all_in_or_all_out():
    s = {"mlp.0": torch.tensor([5.0, 5.0, 5.0, 1.0, 0.0])}
    u = {"mlp.0": torch.zeros(5)}
    cls = classify_set_difference(s, u, top_safety=0.2, top_utility=0.0, bottom=0.0)
    assert _members(cls, ESU) == {0, 1, 2}  # no unit scores higher than the tied three
    none = classify_set_difference(s, u, top_safety=0.0, top_utility=0.0, bottom=0.0)
    assert _members(none, CU) == set(range(5))


def test_bad_settings_name_the_key():
    s, u = _pattern()
    with pytest.raises(ConfigError, match="classify.top_safety"):
        classify_set_difference(s, u, top_safety=1.5)
    with pytest.raises(ConfigError, match="classify.bottom"):
        classify_set_difference(s, u, bottom=-0.1)
    with pytest.raises(ConfigError, match="classify.method"):
        classify_from_config(s, u, {"method": "top_k"})
    with pytest.raises(ConfigError, match="classify.normalization"):
        classify_set_difference(s, u, normalization="zscore")


def _run(tmp_path, name, *overrides):
    from testkit import write_sets as _write_sets

    s, u = _write_sets(tmp_path)
    cfg = compose("attribute", ["model=tiny", f"calibration.safety.path={s}", f"calibration.utility.path={u}",
                                "calibration.safety.prompt=prompt", "calibration.safety.input=null",
                                "calibration.safety.response=response", "calibration.utility.prompt=prompt",
                                "calibration.utility.input=null", "calibration.utility.response=response",
                                "calibration.utility.hash_split=null", "calibration.batch_size=4",
                                "calibration.max_length=64", "classify=set_difference", *overrides],
                  output_dir=tmp_path / name)
    run_attribution(cfg)
    return json.loads((tmp_path / name / "unit_map.json").read_text())


def test_attribute_reports_the_resulting_shares(tmp_path):
    small = _run(tmp_path, "small", "classify.top_safety=0.05")
    large = _run(tmp_path, "large", "classify.top_safety=0.25")
    for summary in (small, large):
        for kind in ("mlp", "attn"):  # shares in the metadata are those of the written classes
            total = summary["total"][kind]
            assert summary["metadata"]["class_shares"][kind] == {c: total[c]["share"] for c in CLASS_CODES}
    assert large["total"]["mlp"]["esu"]["count"] > small["total"]["mlp"]["esu"]["count"]
    assert small["metadata"]["classify"]["method"] == "set_difference"


def test_each_unit_gets_one_class_and_shares_match():
    g = torch.Generator().manual_seed(0)
    safety = {f"mlp.{i}": torch.rand(1000, generator=g) for i in range(3)} | {"attn.0": torch.rand(400, generator=g)}
    utility = {k: torch.rand(v.numel(), generator=g) for k, v in safety.items()}
    shares = {"esu": 0.02, "euu": 0.1, "ru": 0.2}
    for norm in ("per_layer", "global"):
        cls = classify(safety, utility, shares=shares, normalization=norm)
        for kind, n in (("mlp", 3000), ("attn", 400)):
            c = torch.cat([v for k, v in cls.items() if k.startswith(kind)])
            assert c.numel() == n and set(c.unique().tolist()) <= set(CLASS_CODES.values())
            for name, share in shares.items():
                assert int((c == CLASS_CODES[name]).sum()) == round(share * n)
        assert classify(safety, utility, shares=shares, normalization=norm)["mlp.1"].equal(cls["mlp.1"])


def test_ties_are_deterministic():
    safety = {"mlp.0": torch.ones(50)}
    utility = {"mlp.0": torch.ones(50)}
    a = classify(safety, utility, shares={"esu": 0.04, "euu": 0.04, "ru": 0.1})
    assert a["mlp.0"][:2].tolist() == [CLASS_CODES["esu"]] * 2  # equal scores: lowest positions first
    assert percentile_ranks(torch.tensor([3.0, 1.0, 3.0])).tolist() == [0.75, 0.0, 0.75]


def test_bad_shares_are_config_errors():
    s = {"mlp.0": torch.rand(10)}
    with pytest.raises(ConfigError, match="sum to less than 1"):
        classify(s, s, shares={"esu": 0.5, "euu": 0.3, "ru": 0.3})
    with pytest.raises(ConfigError, match="normalization"):
        classify(s, s, normalization="zscore")
