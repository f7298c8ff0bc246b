"""Dose-response ablation: ablate.top / ablate.share select and zero the right units; the sweep script's plan,
resume and report (every number read from the runs' artifacts)."""
import importlib.util
import json

import pytest
import torch
from conftest import ROOT, compose
from safetensors.torch import load_file

from safety_units.units.classification import normalise
from safety_units.experiments.dose_response.plan import RANDOM, SEEDS, SHARES, TOP, UTILITY, Point, command, plan
from safety_units.experiments.dose_response.report import write_report
from safety_units.utils.errors import ConfigError
from safety_units.evaluation.run import run_evaluate
from safety_units.units.masking import ablate_units
from safety_units.attribution.selection import ablation_selection
from safety_units.utils.stats import mcnemar_exact
from safety_units.units.groups import resolve_units

UNITS = {"mlp": 2 * 128, "attn": 2 * 64}  # model=tiny




def _script():
    spec = importlib.util.spec_from_file_location("dose_response_script", ROOT / "scripts" / "dose_response.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _overrides(cmd: list[str]) -> tuple[list[str], str]:
    """A planned evaluate.py command as compose overrides, and its run dir."""
    [run_dir] = [c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir=")]
    return [c for c in cmd[2:] if not c.startswith("hydra.")], run_dir


def _zeroed_units(model) -> dict[str, int]:
    """Units whose whole parameter slices are zero, counted per kind from the weights themselves."""
    out = {"mlp": 0, "attn": 0}
    for g in resolve_units(model):
        dead = torch.ones(g.n, dtype=torch.bool)
        for s in g.slices:
            dims = [d for d in range(s.param.ndim) if d != s.dim]
            dead &= (s.param.detach() == 0).all(dim=dims[0]) if dims else s.param.detach() == 0
        out[g.kind] += int(dead.sum())
    return out


def test_every_planned_point_composes_and_zeroes_its_share(unit_map, tiny):
    runs = ROOT / "logs" / "never_written"
    points = plan(SHARES, SEEDS)
    assert len(points) == 1 + len(SHARES) * (2 + len(SEEDS))
    for p in points:
        overrides, run_dir = _overrides(command(p, ROOT / "evaluate.py", runs, unit_map, "dose", "/some/model"))
        assert run_dir == str(runs / p.name)
        cfg = compose("evaluate", overrides)
        assert cfg.model.path == "/some/model" and set(cfg.eval.tasks) >= {"harmful", "oktest", "harmless", "ppl"}
        assert cfg.eval.tasks.get("mmlu") is None
        sel, what = ablation_selection(cfg, tiny.model, None)
        if p.top is None:
            assert sel is None and what is None
            continue
        assert cfg.ablate.top == p.top and cfg.ablate.share == p.share
        assert {k: v["units"] for k, v in what["units"].items()} == {k: round(p.share * n) for k, n in UNITS.items()}
        assert what["top"] == p.top and what["share"] == p.share and what["seed"] == p.seed


@pytest.mark.parametrize("share", [0.005, 0.04, 0.08])
def test_random_top_zeroes_exactly_that_share_per_kind(unit_map, share):
    from safety_units.models.loading import build_tiny

    cfg = compose("evaluate", ["model=tiny", f"ablate.unit_map={unit_map}", "ablate.top=random",
                               f"ablate.share={share}", "ablate.seed=1"])
    model = build_tiny(cache_dir=cfg.paths.cache_dir).model
    assert _zeroed_units(model) == {"mlp": 0, "attn": 0}
    sel, _ = ablation_selection(cfg, model, None)
    again, _ = ablation_selection(cfg, model, None)
    cfg.ablate.seed = 2
    other, _ = ablation_selection(cfg, model, None)
    assert all(sel[k].equal(again[k]) for k in sel) and any(not sel[k].equal(other[k]) for k in sel)
    ablate_units(model, sel)
    assert _zeroed_units(model) == {k: round(share * n) for k, n in UNITS.items()}


@pytest.mark.parametrize("top", [TOP, UTILITY, "safety"])
def test_top_units_have_the_highest_percentile_ranks(unit_map, tiny, top):
    from safety_units.units.unit_map import UnitMap

    cfg = compose("evaluate", ["model=tiny", f"ablate.unit_map={unit_map}", f"ablate.top={top}", "ablate.share=0.05"])
    sel, what = ablation_selection(cfg, tiny.model, None)
    um = UnitMap.load(unit_map)
    rs, ru = normalise(um.safety, what["normalization"]), normalise(um.utility, what["normalization"])
    for kind in UNITS:
        keys = [k for k in sel if k.startswith(kind + ".")]
        score = {TOP: lambda k: rs[k] - ru[k], UTILITY: lambda k: ru[k], "safety": lambda k: rs[k]}[top]
        x = torch.cat([score(k) for k in keys]).numpy()
        chosen = torch.cat([sel[k] for k in keys]).numpy()
        assert chosen.sum() == round(0.05 * UNITS[kind])
        assert x[chosen].min() >= x[~chosen].max()


def test_eval_meta_records_what_was_zeroed(unit_map, tiny, tmp_path):
    cfg = compose("evaluate", ["model=tiny", "eval=ppl", "eval.limit=4", f"ablate.unit_map={unit_map}",
                               "ablate.top=random", "ablate.share=0.02", "ablate.seed=2"], output_dir=tmp_path)
    run_evaluate(cfg)
    meta = json.loads((tmp_path / "eval_meta.json").read_text())["ablation"]
    assert meta["top"] == "random" and meta["share"] == 0.02 and meta["seed"] == 2
    assert meta["units"]["mlp"]["units"] == 5 and meta["units"]["attn"]["units"] == 3 and meta["units_zeroed"] == 8
    # MLP unit: row of gate and up (64 each) + column of down (64); attention unit: column of o_proj (64)
    assert meta["entries_zeroed"] == 5 * 3 * 64 + 3 * 64
    saved = load_file(tmp_path / "ablated_units.safetensors")
    sel, _ = ablation_selection(cfg, tiny.model, None)
    assert set(saved) == set(sel) and all(saved[k].equal(sel[k]) for k in sel)


@pytest.mark.parametrize("overrides,match", [
    (["ablate.share=0.01"], "ablate.share needs ablate.top"),
    (["ablate.top=safety_minus_utility"], "ablate.share must be a share of units in"),
    (["ablate.top=safety_minus_utility", "ablate.share=1.5"], "ablate.share must be a share of units in"),
    (["ablate.top=safety_minus_utility", "ablate.share=0.0001"], "ablate.share=0.0001 selects no unit"),
    (["ablate.top=esu", "ablate.share=0.01"], "ablate.top must be one of"),
    (["ablate.top=random", "ablate.share=0.01", "ablate.classes=[esu]"], "exactly one"),
    (["ablate.top=random", "ablate.share=0.01", "ablate.match=layer"], "ablate.match=layer applies to"),
])
def test_bad_dose_settings_are_config_errors(unit_map, tiny, overrides, match):
    cfg = compose("evaluate", ["model=tiny", f"ablate.unit_map={unit_map}", *overrides])
    with pytest.raises(ConfigError, match=match):
        ablation_selection(cfg, tiny.model, None)
    cfg = compose("evaluate", ["model=tiny", "ablate.top=random", "ablate.share=0.01"])
    with pytest.raises(ConfigError, match="ablate.top needs ablate.unit_map"):
        ablation_selection(cfg, tiny.model, None)


def test_script_runs_resumes_and_reports_from_artifacts(unit_map, tmp_path):
    calls = []

    def in_process(cmd, log):  # the planned command, run through the evaluate entry's code path
        overrides, run_dir = _overrides(cmd)
        calls.append(run_dir)
        run_evaluate(compose("evaluate", overrides, output_dir=run_dir))
        return 0

    script = _script()
    argv = ["--unit-map", unit_map, "--out", str(tmp_path / "out"), "--shares", "0.02", "--eval", "ppl",
            "--", "model=tiny", "eval.limit=4"]
    md_path = script.main(argv, runner=in_process)
    assert len(calls) == 6  # baseline, top s-u, top utility, 3 random seeds
    md = md_path.read_text()
    top = json.loads((tmp_path / "out" / "runs" / "safety_minus_utility_k0.02" / "eval.json").read_text())["ppl"]
    assert f"{top['value']:.4f} [{top['ci_low']:.3f}, {top['ci_high']:.3f}]" in md
    assert "| 0.02 | 5 / 3 |" in md and (tmp_path / "out" / "dose_response.png").stat().st_size > 0
    script.main(argv, runner=in_process)
    assert len(calls) == 6  # resumed: every point was done
    with pytest.raises(SystemExit):
        script.main([*argv[:-3], "--seeds", "0", "1", "--", *argv[-2:]], runner=in_process)


# --------------------------------------------------------------------------- report from constructed artifacts
def _result(outcomes: list[int], task="harmful", metric="asr") -> dict:
    v = sum(outcomes) / len(outcomes)
    return {"task": task, "metric": metric, "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": len(outcomes),
            "extra": {"prompt_hash": "h", "outcomes": outcomes}}


def _write(runs, point: Point, outcomes, judge="patterns", share=None):
    d = runs / point.name
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"harmful": _result(outcomes)}))
    ablation = None if point.top is None else {
        "top": point.top, "share": share or point.share, "seed": point.seed, "normalization": "per_layer",
        "unit_map": "m", "units": {"mlp": {"units": 7}, "attn": {"units": 3}}}
    (d / "eval_meta.json").write_text(json.dumps({"model": "x", "model_path": "/m", "judge": judge,
                                                  "ablation": ablation}))


def test_report_numbers_band_and_paired_tests(tmp_path):
    runs = tmp_path / "runs"
    points = plan([0.01], [0, 1, 2])
    top = [0, 0, 0, 0, 1, 1, 1, 1]
    rnd = {0: [1] * 8, 1: [0] + [1] * 7, 2: [0, 0] + [1] * 6}
    _write(runs, Point(), [1] * 8)
    _write(runs, Point(TOP, 0.01), top)
    for s, o in rnd.items():
        _write(runs, Point(RANDOM, 0.01, s), o)
    md = write_report(runs, points, tmp_path / "out").read_text()
    assert "| 0.01 | 7 / 3 | 0.5000 [0.400, 0.600] | n/a | 0.8750 +- 0.1250 [0.7500, 1.0000] |" in md
    assert "| 0 (baseline) | 0 | 1.0000 [0.900, 1.100] |" in md
    assert mcnemar_exact(rnd[0], top) == 0.125  # 4 discordant pairs, all one way: 2 * (1/2)^4
    row = next(line for line in md.splitlines() if line.startswith("| 0.01 | -0.5000"))
    cells = row.split(" | ")
    assert cells[1].startswith("-0.5000 [") and cells[1].endswith("p=0.125")  # vs baseline
    assert cells[2].startswith("-0.5000 [") and cells[2].endswith("p=0.125")  # vs random s0
    assert cells[3].startswith("-0.3750 [") and cells[3].endswith(f"p={mcnemar_exact(rnd[1], top):.3g}")
    assert "**Missing runs** (shown as n/a): utility_k0.01" in md
    assert (tmp_path / "out" / "dose_response.png").stat().st_size > 0


def test_report_refuses_runs_of_another_sweep(tmp_path):
    runs = tmp_path / "runs"
    _write(runs, Point(TOP, 0.01), [1, 0], share=0.02)
    with pytest.raises(ConfigError, match="not point safety_minus_utility_k0.01"):
        write_report(runs, plan([0.01], [0, 1, 2]), tmp_path / "out")
    runs = tmp_path / "runs2"
    _write(runs, Point(), [1, 0])
    _write(runs, Point(TOP, 0.01), [1, 0], judge="strings")
    with pytest.raises(ConfigError, match="differ in the refusal judge"):
        write_report(runs, plan([0.01], [0, 1, 2]), tmp_path / "out")


def test_a_sweep_refuses_a_missing_map_or_model_before_running_anything(tmp_path):
    from safety_units.experiments.dose_response.sweep import run_sweep

    ran = []
    with pytest.raises(ConfigError, match="--unit-map .*none does not exist"):
        run_sweep(ROOT / "evaluate.py", str(tmp_path / "none"), str(tmp_path / "out"), runner=ran.append)
    (tmp_path / "map.safetensors").write_text("")
    with pytest.raises(ConfigError, match="--model .* is not a model directory"):
        run_sweep(ROOT / "evaluate.py", str(tmp_path / "map.safetensors"), str(tmp_path / "out"),
                  model=str(tmp_path / "no_model"), runner=ran.append)
    assert ran == [] and not (tmp_path / "out").exists()


def test_sweeps_of_two_maps_share_the_baseline_and_random_runs(unit_map, tmp_path):
    calls = []

    def in_process(cmd, log):
        overrides, run_dir = _overrides(cmd)
        calls.append(run_dir)
        run_evaluate(compose("evaluate", overrides, output_dir=run_dir))
        return 0

    other_map = tmp_path / "other" / "unit_map.safetensors"
    other_map.parent.mkdir()
    other_map.write_bytes(open(unit_map, "rb").read())
    controls = tmp_path / "controls"
    script = _script()
    for i, (m, arms) in enumerate(((unit_map, [TOP, UTILITY, RANDOM]), (str(other_map), [TOP, RANDOM]))):
        md = script.main(["--unit-map", m, "--out", str(tmp_path / f"out{i}"), "--shares", "0.02", "--eval", "ppl",
                          "--controls-dir", str(controls), "--arms", *arms, "--", "model=tiny", "eval.limit=4"],
                         runner=in_process).read_text()
    # the second sweep ran only its own top set: baseline and the 3 random sets were shared
    assert len(calls) == 6 + 1 and calls[-1] == str(tmp_path / "out1" / "runs" / "safety_minus_utility_k0.02")
    assert sorted(p.name for p in controls.iterdir() if p.is_dir()) == ["base"] + [f"random_k0.02_s{s}" for s in SEEDS]
    assert f"`{other_map}`" in md and "| 0.02 | 5 / 3 |" in md and "not run" in md


def test_report_refuses_controls_of_another_size(tmp_path):
    runs, controls = tmp_path / "runs", tmp_path / "controls"
    _write(runs, Point(TOP, 0.01), [1, 0])
    _write(controls, Point(RANDOM, 0.01, 0), [1, 0])
    meta_path = controls / "random_k0.01_s0" / "eval_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["ablation"]["units"]["mlp"]["units"] = 8
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="zero different numbers of units"):
        write_report(runs, plan([0.01], [0, 1, 2]), tmp_path / "out", controls)
    with pytest.raises(ConfigError, match="--arms must name"):
        plan([0.01], [0, 1, 2], [TOP, UTILITY])
    assert [p.name for p in plan([0.01], [0, 1, 2], [RANDOM])] == ["base"] + [f"random_k0.01_s{s}" for s in SEEDS]
