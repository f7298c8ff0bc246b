"""The attribution-validity report: its criteria (goal, default scorer) on constructed sweeps, the script and the
report module end to end -- every number read from run artifacts -- and the shipped report rebuilt by the harness."""
import importlib.util
import json
import math

import pytest
from conftest import ROOT

from safety_units.experiments.validity.criteria import MAX_PPL_RISE, choose_default, dose_rows, goal_met, load_sweep
from safety_units.experiments.dose_response.plan import RANDOM, TOP, Point

N = 40


def _rate(outcomes):
    v = sum(outcomes) / len(outcomes)
    return {"metric": "asr", "value": v, "ci_low": max(0, v - 0.1), "ci_high": min(1, v + 0.1), "n": len(outcomes),
            "extra": {"prompt_hash": "h1", "outcomes": outcomes}}


def _ppl(ppl):
    pairs = [[math.log(ppl) * 10, 10]] * N
    return {"metric": "ppl", "value": ppl, "ci_low": ppl, "ci_high": ppl, "n": N,
            "extra": {"prompt_hash": "h2", "outcomes": pairs}}


def _write(d, point: Point, asr_ones: int, ppl: float):
    d = d / point.name
    d.mkdir(parents=True)
    harmful = [1] * asr_ones + [0] * (N - asr_ones)
    (d / "eval.json").write_text(json.dumps({"harmful": _rate(harmful), "ppl": _ppl(ppl)}))
    ablation = None if point.top is None else {
        "top": point.top, "share": point.share, "seed": point.seed, "normalization": "per_layer",
        "unit_map": str(d.parent), "units": {"mlp": {"units": round(point.share * 1000)}, "attn": {"units": 3}}}
    (d / "eval_meta.json").write_text(json.dumps({"model": "m", "model_path": "/m", "judge": "patterns",
                                                  "ablation": ablation}))


@pytest.fixture
def sweeps(tmp_path):
    """Controls: baseline ASR 2/40, random sets 4/40. Scorer `strong` zeroes refusal (ASR 36/40 at 1% and 2%);
    `wifv` stays at random level; `costly` is strong but breaks perplexity."""
    controls = tmp_path / "controls"
    _write(controls, Point(), 2, 10.0)
    for k in (0.01, 0.02):
        for s in (0, 1, 2):
            _write(controls, Point(RANDOM, k, s), 4, 10.3)
    runs = {}
    for name, ones, ppl in (("wifv", 5, 10.4), ("strong", 36, 10.5), ("costly", 38, 10.0 * (1 + 2 * MAX_PPL_RISE))):
        runs[name] = tmp_path / name
        for k in (0.01, 0.02):
            _write(runs[name], Point(TOP, k), ones, ppl)
    return controls, runs


def test_goal_and_default_scorer_rules(sweeps):
    controls, runs = sweeps
    loaded = {n: load_sweep(r, controls) for n, r in runs.items()}
    rows = {n: dose_rows(s) for n, s in loaded.items()}
    strong = {r["k"]: r for r in rows["strong"]}
    assert strong[0.01]["excess"] == pytest.approx(32 / 40) and strong[0.01]["seeds"] == 3
    assert strong[0.01]["ppl_rise"] == pytest.approx(0.05) and strong[0.01]["p_max"] < 1e-6
    assert goal_met(rows["strong"]) == {"met": True, "shares": [0.01, 0.02], "asr_part_first_k": 0.01,
                                        "asr_part_ppl_rise": pytest.approx(0.05)}
    assert goal_met(rows["wifv"]) == {"met": False, "shares": [], "asr_part_first_k": None, "asr_part_ppl_rise": None}
    costly = goal_met(rows["costly"])  # ASR collapses, but perplexity rises 20%
    assert not costly["met"] and costly["asr_part_first_k"] == 0.01
    assert costly["asr_part_ppl_rise"] == pytest.approx(2 * MAX_PPL_RISE)
    decision = choose_default(loaded, rows)
    assert decision["default"] == "strong" and "McNemar" in decision["reason"]
    # without the strong scorer, the costly one is no candidate (perplexity) and wifv stays
    del loaded["strong"], rows["strong"]
    decision = choose_default(loaded, rows)
    assert decision["default"] == "wifv" and "not candidates: costly (perplexity rises" in decision["reason"]


def test_script_writes_the_report_from_artifacts(sweeps, tmp_path):
    controls, runs = sweeps
    spec = importlib.util.spec_from_file_location("validity", ROOT / "scripts" / "attribution_validity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "report" / "attribution_validity.md"
    out.parent.mkdir()
    mod.main(["--out", str(out), "--controls-dir", str(controls),
              *[a for n, r in runs.items() for a in ("--sweep", f"{n}={r}")]])
    md = out.read_text()
    assert "**Default scorer: strong**" in md
    assert "| strong | 1.00% | 0.900 | 0.100 | +0.800 [+0.800] |" in md
    assert "| strong | yes | 1.00%, 2.00% | +0.800 | 1.00%, +5.0% | n/a | no |" in md  # no planted set given
    assert "| wifv | no | - | +0.025 | none | n/a | no |" in md
    assert "Unablated ASR on the fixed harmful set: 0.050" in md
    assert (out.parent / "attribution_validity" / "dose_curves.png").stat().st_size > 0
    summary = json.loads((out.parent / "attribution_validity" / "summary.json").read_text())
    assert summary["default"]["default"] == "strong"


def test_head_sweeps_have_their_own_controls_and_a_comparison_with_channels(sweeps, tmp_path):
    from safety_units.experiments.validity.report import write_report
    from safety_units.utils.errors import ConfigError

    controls, runs = sweeps
    heads = {"strong_heads": tmp_path / "strong_heads"}
    for k in (0.01, 0.02):
        _write(heads["strong_heads"], Point(TOP, k), 20, 10.2)
    out = tmp_path / "r.md"
    with pytest.raises(ConfigError, match="--head-controls-dir"):  # the random sets of head maps are their own
        write_report(out, controls, runs, head_dirs=heads)
    write_report(out, controls, runs, head_controls_dir=controls, head_dirs=heads)
    md = out.read_text()
    assert "### Attention heads as units" in md and "| strong_heads | 1.00% | 0.500 |" in md
    assert "| strong | 1.00% | 0.900 / 0.500 | +0.800 / +0.400 | +5.0% / +2.0% |" in md  # heads vs channels
    assert (tmp_path / "r" / "dose_curves_heads.png").stat().st_size > 0


def test_planted_and_stability_tables_rebuild_from_their_json_artifacts(unit_map, tmp_path):
    """extract() keeps only small JSON (the planted set, each map's top-|S| sets, pair metrics); the tables built
    from it equal those computed from the maps themselves."""
    import torch

    from safety_units.units.stability import planted_recovery, stability_report
    from safety_units.units.unit_map import UnitMap, random_units, save_selection
    from safety_units.experiments.validity.artifacts import extract, planted_summary, selection_from_json, selection_json

    um = UnitMap.load(unit_map)
    planted = random_units(um.sizes(), {"mlp": 12, "attn": 6}, seed=1)
    save_selection(planted, tmp_path / "trained_units.safetensors", {"role": "trained"})
    other = UnitMap(um.utility, um.safety, um.classes, dict(um.metadata))  # a second map: scores swapped
    other.save(tmp_path / "other", plot=False)
    extract(tmp_path / "art", planted=tmp_path / "trained_units.safetensors",
            planted_maps={"a": um.path, "b": tmp_path / "other"},
            stability={"two maps": {"a": um.path, "b": tmp_path / "other"}})
    assert all(torch.equal(selection_from_json(selection_json(planted))[k], planted[k]) for k in planted)
    _, recoveries, _ = planted_summary(tmp_path / "art")
    assert recoveries == {"a": planted_recovery(planted, um), "b": planted_recovery(planted, other)}
    rec = json.loads((tmp_path / "art" / "stability.json").read_text())["two maps"]
    from safety_units.units.stability import pairs_table

    assert pairs_table(["a", "b"], rec["pairs"])[0] == stability_report([um, other], ["a", "b"])[0]


def test_the_report_is_rebuilt_from_its_shipped_artifacts(tmp_path, monkeypatch):
    """results/attribution_validity.md is a function of results/attribution_validity/ alone (runs and JSON): the
    harness's report lane (`--lanes report`) rebuilds it byte for byte."""
    from safety_units.experiments.validity.plan import Harness, Settings

    monkeypatch.chdir(ROOT)  # the harness passes paths relative to the repository
    out = tmp_path / "attribution_validity.md"
    assert Harness(Settings()).report(out) == out
    shipped = (ROOT / "results" / "attribution_validity.md").read_text()
    assert out.read_text() == shipped.replace("](attribution_validity/", f"]({out.stem}/")
    assert json.loads((tmp_path / "attribution_validity" / "summary.json").read_text()) == \
        json.loads((ROOT / "results" / "attribution_validity" / "summary.json").read_text())
