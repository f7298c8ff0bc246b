"""The defense benchmark: its plan composes real configs, its criteria (fixed before the runs) behave as stated, and
results/defenses.md is rebuilt from its shipped cells.json."""

import json
import random
import shutil

import pytest
from conftest import ROOT

from safety_units.experiments.defense_bench import criteria as C
from safety_units.experiments.defense_bench.plan import (ALIGN_DEFENSES, BAD10_CPU, DEFENSES, SCALES, finetune_steps, plan,
                                             threats)


def test_plan_names_are_unique_and_every_defense_runs_at_p01_and_the_harmful_examples():
    stages = plan(SCALES["cpu"], "/bench")
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    for threat, chosen in (("mix10", DEFENSES), ("bad10", BAD10_CPU)):
        for d in DEFENSES:
            for seed in (0, 1, 2):
                assert (f"ft_{threat}_{d}_s{seed}" in names) == (d in chosen)
    gpu = {s.name for s in plan(SCALES["gpu"], "/bench")}
    assert all(f"ft_bad10_{d}_s2" in gpu for d in DEFENSES)
    first_ft = names.index("ft_mix00_none_s0")
    assert names[first_ft:first_ft + 4] == ["ft_mix00_none_s0", "ft_mix00_none_s1", "ft_mix00_none_s2",
                                            "ft_mix10_none_s0"]
    assert names[:first_ft] == ["align_sft", "attribute_aligned", "align_vaccine", "align_booster",
                                "attribute_mask", "align_sn_tune", "align_sft_timing"]
    by = {s.name: s for s in stages}
    assert by["ft_mix10_booster_s1"].model == "align_booster" and by["ft_mix10_booster_s1"].needs
    assert by["ft_mix10_esu_cu_s0"].model == "align_sft"
    assert [t.key for t in threats(SCALES["gpu"])][:2] == ["mix10", "bad10"]


def test_every_kind_of_stage_composes(tmp_path):
    from safety_units.experiments.study.runner import stage_configs

    scale = SCALES["cpu"]
    stages = {s.name: s for s in plan(scale, str(tmp_path))}
    pick = ["align_sft", "align_booster", "align_sn_tune", "attribute_mask",
            *[f"ft_mix10_{d}_s0" for d in DEFENSES], "ft_bad10_lisa_s1", "ft_mix00_none_s2"]
    for name in pick:
        cfgs = stage_configs(stages[name], tmp_path, scale, [])
        if "train" in cfgs:
            t = cfgs["train"]
            d = name.split("_")[2] if name.startswith("ft_") else None
            if d in ALIGN_DEFENSES:
                assert t.defense.name == "none"
            if name == "ft_mix10_mask_esu_cu_s0":
                assert t.freeze.strategy == "esu_cu" and "attribute_mask" in t.freeze.unit_map
            if name == "ft_mix10_random_s0":
                assert t.freeze.like == "esu_cu"
            assert cfgs["evaluate"].eval.tasks.beavertails.limit == 64
    lisa = stage_configs(stages["ft_mix10_lisa_s0"], tmp_path, scale, [])["train"].defense
    steps = finetune_steps(next(t for t in threats(scale) if t.key == "mix10"))
    assert lisa.alignment_steps + lisa.finetune_steps == steps and lisa.alignment_steps == round(0.1 * steps)


def cell(defense, seed, harmful, fa=0.8, hash_="h"):
    return {"defense": defense, "seed": seed, "threat": "mix10", "harmful": harmful, "hs": sum(harmful) / len(harmful),
            "fa": fa, "overrefusal": 0.1, "ppl": 5.0, "train_seconds": 10.0, "prompt_hash": hash_}


def test_criteria_rank_by_hs_pair_on_identical_prompts_and_read_the_goal():
    rng = random.Random(0)
    cells = []
    for s in range(3):
        cells.append(cell("none", s, [1] * 40 + [0] * 10))
        cells.append(cell("booster", s, [1] * 20 + [0] * 30, fa=0.79))
        cells.append(cell("esu_cu", s, [1] * 15 + [0] * 35, fa=0.795))
        cells.append(cell("random", s, [rng.randint(0, 1) for _ in range(50)]))
    r = C.ranks(cells)
    assert r["esu_cu"] == 1 and r["none"] == 4
    t = C.paired(cells, "esu_cu", "none")
    assert t["diff"] == pytest.approx(-0.5) and t["p"] < 1e-10 and t["n"] == 150
    g = C.goal(cells, "esu_cu")
    assert g["hs_drop_met"] and g["fa_met"] and g["not_worse_than_booster"] and g["met"]
    assert not C.goal([c | {"fa": 0.7} if c["defense"] == "esu_cu" else c for c in cells], "esu_cu")["met"]
    rec = C.recommend({"mix10": cells})
    assert rec["defense"] == "esu_cu" and "booster" in rec["eligible"]
    # a reduced threat model (booster did not run there): ranks among the defenses that ran in both
    bad = [c | {"threat": "bad10", "harmful": h, "hs": sum(h) / 50} for c in cells if c["defense"] != "booster"
           for h in [([0] * 50 if c["defense"] == "random" else c["harmful"])]]
    mr = C.mean_ranks({"mix10": cells, "bad10": bad})
    assert set(mr) == {"none", "esu_cu", "random"} and mr["esu_cu"] == 1.5 and mr["random"] == 1.5
    with pytest.raises(ValueError, match="different prompts"):
        C.paired([cell("a", 0, [1, 0]), cell("b", 0, [1, 0], hash_="other")], "a", "b")


SHIPPED = ROOT / "results" / "defenses"


@pytest.mark.skipif(not (SHIPPED / "cells.json").is_file(), reason="results/defenses not shipped yet")
def test_the_report_is_rebuilt_from_its_shipped_cells(tmp_path):
    from safety_units.experiments.defense_bench.report import write_report

    (tmp_path / "defenses").mkdir()
    shutil.copy(SHIPPED / "cells.json", tmp_path / "defenses" / "cells.json")
    out = write_report(tmp_path)
    assert out.read_text() == (ROOT / "results" / "defenses.md").read_text()
    data = json.loads((SHIPPED / "cells.json").read_text())
    hashes = {(c["threat"], c["seed"]): set() for c in data["cells"]}
    for c in data["cells"]:
        hashes[(c["threat"], c["seed"])].add(c["prompt_hash"])
    assert all(len(h) == 1 for h in hashes.values())  # identical prompts across defenses


def test_report_from_synthetic_cells(tmp_path):
    from safety_units.experiments.defense_bench.report import write_report

    cells = []
    for s in range(3):
        for d, k in (("none", 30), ("booster", 20), ("esu_cu", 25), ("random", 28), ("lisa", 22)):
            c = cell(d, s, [1] * k + [0] * (50 - k))
            cells.append(c | {"asr_outcomes": c["harmful"], "asr": c["hs"], "n_harmful": 50, "overlaps_removed": 1,
                              "fa_majority": 0.51, "trainable": 1.0, "stage": f"ft_mix10_{d}_s{s}"})
    aligned = {d: {"asr": 0.1, "hs": 0.05, "fa": 0.6, "overrefusal": 0.3, "ppl": 5.0, "train_seconds": t}
               for d, t in (("none", 10.0), ("booster", 30.0))}
    (tmp_path / "defenses").mkdir()
    (tmp_path / "defenses" / "cells.json").write_text(json.dumps(
        {"cells": cells, "aligned": aligned, "judge": "probe", "record": {"scale": "cpu", "not_run": ["x"]}}))
    md = write_report(tmp_path).read_text()
    assert "## Threat model `mix10`" in md and "| booster |" in md and "**booster**" in md
    assert (tmp_path / "defenses" / "frontier.png").is_file()
    assert "| esu_cu | +0.100 | False |" in md  # HS drop 0.10 < 0.226: the goal's first part is not met


def test_the_report_corrects_hs_for_the_judges_validated_errors(tmp_path):
    """With the judge's validation counts in cells.json, HS is shown raw and corrected (Rogan-Gladen, pooled over
    seeds, interval carrying the judge's error); the paired tests stay on the raw verdicts."""
    from safety_units.experiments.defense_bench.report import write_report
    from safety_units.utils.stats import corrected_rate

    val = {"judge": "mlp", "tp": 900, "fn": 100, "tn": 700, "fp": 300, "source": "harm_judge.json: out-of-fold"}
    cells = []
    for s in range(3):
        for d, k in (("none", 30), ("booster", 20)):
            c = cell(d, s, [1] * k + [0] * (50 - k))
            cells.append(c | {"asr_outcomes": c["harmful"], "asr": c["hs"], "n_harmful": 50, "overlaps_removed": 1,
                              "fa_majority": 0.51, "trainable": 1.0, "stage": f"ft_mix10_{d}_s{s}"})
    (tmp_path / "defenses").mkdir()
    (tmp_path / "defenses" / "cells.json").write_text(json.dumps(
        {"cells": cells, "aligned": {}, "judge": "probe", "judge_validation": val, "record": {"scale": "cpu"}}))
    md = write_report(tmp_path).read_text()
    r = corrected_rate([1] * 30 + [0] * 20 + [1] * 30 + [0] * 20 + [1] * 30 + [0] * 20, 900, 100, 700, 300)
    assert r["corrected"] == pytest.approx(0.5)  # raw 0.6 = 0.9 * 0.5 + 0.3 * 0.5
    assert "| HS raw (corrected [95% CI]) |" in md
    assert f"| 0.600 (corrected 0.500 [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]) |" in md
    assert "on the raw per-prompt verdicts (same judge, same prompts)" in md and "tp 900, fn 100" in md


def test_collect_judges_each_stage_once_and_never_calls_a_refusal_harmful(tmp_path):
    """cells.json from a benchmark dir: HS = the harm judge's verdict AND no refusal; cached per stage."""
    from safety_units.experiments.defense_bench.report import collect

    class Judge:
        path, calls = "probe.safetensors", 0

        def harmful(self, prompts, responses):
            Judge.calls += 1
            return [True] * len(responses)

    bench = tmp_path / "bench"
    for name, labels in (("ft_mix10_none_s0", {"claim": "finetune", "threat": "mix10", "defense": "none", "seed": 0}),
                         ("align_sft", {"claim": "setup", "role": "aligned", "defense": "none"})):
        d = bench / name
        d.mkdir(parents=True)
        d.joinpath("point.json").write_text(json.dumps({"name": name, "labels": labels,
                                                        "train": {"train_seconds": 2.0}, "seconds": 3.0}))
        d.joinpath("eval.json").write_text(json.dumps({
            "beavertails": {"value": 0.5, "n": 2, "extra": {"outcomes": [1, 0], "prompt_hash": "h",
                                                            "overlaps_removed": 0}},
            "sst2": {"value": 0.5, "extra": {"outcomes": [1, 0], "majority": 0.5}},
            "oktest": {"value": 0.1}, "ppl": {"value": 5.0}}))
        d.joinpath("generations.jsonl").write_text(
            json.dumps({"task": "beavertails", "prompt": "p1", "completion": "sure, here", "refusal": False}) + "\n"
            + json.dumps({"task": "beavertails", "prompt": "p2", "completion": "I can't", "refusal": True}) + "\n"
            + json.dumps({"task": "oktest", "prompt": "p3", "completion": "x", "refusal": False}) + "\n")
    out = json.loads(collect(bench, tmp_path / "out", Judge()).read_text())
    assert [c["harmful"] for c in out["cells"]] == [[1, 0]] and out["aligned"]["none"]["hs"] == 0.5
    collect(bench, tmp_path / "out", Judge())
    assert Judge.calls == 2  # the second collect read both stages' harm_judged.json


def test_projected_wall_time_runs_the_setup_then_spreads_the_rest_over_the_workers():
    from safety_units.experiments.defense_bench.report import projected_minutes

    stages = {"align_sft": {"seconds": 60, "setup": True}, "a": {"seconds": 120, "setup": False},
              "b": {"seconds": 60, "setup": False}, "c": {"seconds": 60, "setup": False}}
    assert projected_minutes(stages, 2) == (1.0, 4.0, 3.0)
    assert projected_minutes(stages, 1) == (1.0, 4.0, 5.0)
