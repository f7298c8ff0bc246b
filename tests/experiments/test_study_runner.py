"""The v2 study's plan and runner (safety_units.experiments.study.plan / study_runner, scripts/run_study.py): every stage
composes at both scales, stages train a copy and evaluate it in memory, --resume skips finished stages."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT

from safety_units.experiments.study.plan import ABLATED, FREEZES, SCALES, a_objectives, plan, threats
from safety_units.experiments.study.runner import StageExists, run_study, stage_configs

# The CPU scale shrunk to a tiny random model: seconds per stage.
TINY = replace(
    SCALES["cpu"], name="tiny", base_model=["model=tiny"],
    align=["data=mix", "data.num_samples=16", "data.max_length=64", "data.batch_size=8", "trainer.max_epochs=1",
           "optim.lr=1e-3", "export=true"],
    budget_align=["data=mix", "data.num_samples=8", "data.max_length=64", "data.batch_size=8",
                  "trainer.max_epochs=1"],
    finetune=["data.num_samples=8", "data.max_length=64", "data.batch_size=8", "trainer.max_epochs=1",
              "optim.lr=1e-3"],
    teacher=["model@data.self_distill.teacher=tiny", "data.self_distill.max_new_tokens=8"],
    attribute=["calibration.nsamples=8", "calibration.max_length=64"],
    eval=["eval.max_new_tokens=8", "eval.tasks.harmful.limit=6", "eval.tasks.oktest.limit=6",
          "eval.tasks.ppl.limit=4", "eval.tasks.ppl_dolly.limit=4"],
    seeds=[0], random_seeds=[0], a_lrs=["1e-3"], aoa_epochs=[1], mix_shares=[0.25])


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_study_stage_composes(scale, tmp_path):
    """Hours of study cannot die on a typo: every stage's configs compose, and they say what the plan means."""
    sc = SCALES[scale]
    stages = plan(sc, str(tmp_path))
    names = [s.name for s in stages]
    n_c = len(threats(sc)) * len(FREEZES) * len(sc.seeds)
    assert len(set(names)) == len(names) == 5 + len(ABLATED) * (1 + len(sc.random_seeds)) + \
        3 * sum(len(lrs) for lrs in a_objectives(sc).values()) * len(sc.seeds) + n_c
    assert len(sc.seeds) >= 3 and len(sc.a_lrs) >= 2 and sc.mix_shares == [0.05, 0.1, 0.2]
    aligned = f"{tmp_path}/align/model"
    for st in stages:
        seed, lab = st.labels.get("seed"), st.labels
        if seed not in (None, sc.seeds[0]) and "random" not in (lab.get("freeze"), lab.get("method")):
            continue  # other seeds differ only in `seed` (checked below on the seed-0 stages and every random set)
        cfgs = stage_configs(st, tmp_path, sc, [])
        assert all(c.paths.output_dir == str(tmp_path / st.name) for c in cfgs.values())
        if st.kind in ("align", "train_eval"):
            t = cfgs["train"]
            assert t.trainer.enable_checkpointing is False and (t.export is True) == (st.kind == "align")
        if st.name.startswith("c_"):
            t, lab = cfgs["train"], st.labels
            assert t.model.path == aligned and t.seed == lab["seed"]
            assert t.freeze.strategy == {"none": "none", "esu": "esu", "esu_cu": "esu_cu", "random": "random",
                                         "layers": "layers"}[lab["freeze"]]
            if lab["freeze"] == "random":
                assert t.freeze.like == "esu_cu" and t.freeze.seed == lab["seed"]
            if lab["freeze"] == "layers":
                assert t.freeze.layers_like == "esu_cu"
            if lab["family"] == "harmful_mix":
                assert t.data.harmful_share == lab["strength"]
            if lab["family"] == "aoa":
                assert t.trainer.max_epochs == lab["strength"] and "AOA" in cfgs["evaluate"].eval.system
                assert t.data.batch_size < 10  # AOA's 10 conversations in one batch: every seed the same run
            else:
                assert cfgs["evaluate"].eval.system is None
        if st.name.startswith("a_"):
            t = cfgs["train"]
            assert t.model._target_.endswith("load_smollm2") and t.optim.lr == float(st.labels["lr"])
            if st.labels["method"] == "random":
                assert t.freeze.like == "ru_only" and t.freeze.unit_map.endswith("attribute_base/unit_map.safetensors")
        if st.name.startswith("b_random_"):
            a = cfgs["evaluate"].ablate
            assert a.random_like == st.labels["like"] and a.seed == st.labels["seed"] and not a.classes


def test_stages_train_a_copy_evaluate_it_and_resume_skips_them(tmp_path):
    study = tmp_path / "study"
    only = r"^(attribute_base|align|shipped|attribute_aligned|c_alpaca_(none|esu_cu|layers)_s0|c_mix25_random_s0)$"
    rec = run_study(TINY, study, only=only)
    assert rec["failed"] == {} and len(rec["ran"]) == 8
    for name in ("align", "shipped", "c_alpaca_none_s0", "c_alpaca_esu_cu_s0", "c_mix25_random_s0"):
        ev = json.loads((study / name / "eval.json").read_text())
        assert set(ev) == {"harmful", "oktest", "ppl", "ppl_dolly"}
    point = json.loads((study / "c_alpaca_esu_cu_s0" / "point.json").read_text())
    assert point["labels"]["freeze"] == "esu_cu" and point["train"]["global_step"] == 1
    assert point["train"]["frozen_max_abs_delta"] == 0.0  # the frozen units of the copy did not move
    layers = json.loads((study / "c_alpaca_layers_s0" / "point.json").read_text())["train"]["freeze"]
    assert layers["layers_like"] == "esu_cu" and layers["layers"]
    mix = json.loads((study / "c_mix25_random_s0" / "point.json").read_text())["train"]["data_stats"]
    assert mix["harmful_share"] == 0.25 and mix["sources"]["benign"] == 6  # a random teacher answers nothing
    # every fine-tune starts from the aligned model, not from the previous stage's copy
    ppl = {n: json.loads((study / n / "eval.json").read_text())["ppl"]["value"]
           for n in ("align", "c_alpaca_none_s0", "c_alpaca_esu_cu_s0")}
    assert len(set(ppl.values())) == 3
    recorded = json.loads((study / "study.json").read_text())
    assert recorded["scale"] == "tiny" and recorded["ran"] == rec["ran"]

    again = run_study(TINY, study, only=only, resume=True)
    assert again["ran"] == [] and len(again["skipped"]) == 8
    with pytest.raises(StageExists, match="pass --resume"):
        run_study(TINY, study, only="^shipped$")
    changed = replace(TINY, eval=[*TINY.eval, "eval.max_new_tokens=4"])  # another config: the output is stale
    redo = run_study(changed, study, only="^(shipped|align)$", resume=True)
    assert redo["ran"] == ["align", "shipped"]


def test_a_failed_stage_is_recorded_and_the_rest_still_run(tmp_path):
    study = tmp_path / "study"
    rec = run_study(TINY, study, only="^(aligned_aoaprompt|shipped)$")  # no aligned model yet
    assert rec["ran"] == ["shipped"] and "align' has not finished" in rec["failed"]["aligned_aoaprompt"]
    assert "Traceback" in (study / "aligned_aoaprompt.log").read_text()
    assert json.loads((study / "study.json").read_text())["failed"] == rec["failed"]


def test_workers_run_the_stages_after_the_setup_and_record_a_failure(tmp_path):
    """--workers: the setup here, then the other stages in worker processes (the shared queue); a stage failing in a
    worker is recorded with its log, --resume skips what the workers finished and runs what failed."""
    study = tmp_path / "study"
    only = r"^(attribute_base|align|b_esu|c_alpaca_(none|esu)_s0)$"
    rec = run_study(TINY, study, only=only, workers=2)  # no attribute_aligned: b_esu and c_alpaca_esu have no map
    assert rec["ran"][:2] == ["attribute_base", "align"] and sorted(rec["ran"][2:]) == ["c_alpaca_none_s0"]
    assert set(rec["failed"]) == {"b_esu", "c_alpaca_esu_s0"} and "Traceback" in (study / "b_esu.log").read_text()
    assert (study / "c_alpaca_none_s0" / "eval.json").is_file()
    recorded = json.loads((study / "study.json").read_text())
    assert recorded["workers"] == 2 and recorded["failed"] == rec["failed"]
    again = run_study(TINY, study, only=only.replace("align|", "align|attribute_aligned|"), resume=True, workers=2)
    assert sorted(again["ran"]) == ["attribute_aligned", "b_esu", "c_alpaca_esu_s0"] and again["failed"] == {}
    assert sorted(again["skipped"]) == ["align", "attribute_base", "c_alpaca_none_s0"]
    point = json.loads((study / "c_alpaca_esu_s0" / "point.json").read_text())
    assert point["train"]["frozen_max_abs_delta"] == 0.0


def test_a_spent_time_budget_leaves_the_remaining_stages_not_run(tmp_path):
    rec = run_study(TINY, tmp_path / "study", only="^(shipped|b_esu)$", budget_minutes=0)
    assert rec["ran"] == [] and rec["not_run"] == ["shipped", "b_esu"]


def test_run_study_script_lists_stages_and_rejects_a_bad_selection(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_study", ROOT / "scripts" / "run_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--list", "--scale", "gpu", "--study-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["align", "align"] and "c_aoa10_layers_s2" in out
    with pytest.raises(SystemExit) as e:
        script.main(["--only", "^nothing$", "--study-dir", str(tmp_path), "--no-report"])
    assert e.value.code == 1 and "matches no stage" in capsys.readouterr().err
    assert not Path(tmp_path / "study.json").exists()


def test_sigterm_to_the_runner_stops_its_workers(tmp_path):
    """`kill <runner>` used to leave the worker processes running stages (Lightning's SIGTERM handler in a worker only
    sets a flag) and writing into the study dir; now the runner kills them before it exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(Path(__file__).parent)!r}]\n"
            "from test_study_runner import TINY\nfrom safety_units.experiments.study.runner import run_study\n"
            f"run_study(TINY, __import__('pathlib').Path({str(tmp_path / 's')!r}), "
            "only=r'^a_full_(lr1e-3|dpo_lr2e-4)_s0$', workers=2)\n")
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT)

    def children() -> set[int]:
        out = set()
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == runner.pid:
                    out.add(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
        return out

    seen = []
    for line in runner.stdout:  # the workers have started once one of them announces a stage
        seen.append(line)
        if "[run ]" in line:
            break
    else:
        pytest.fail("the runner ended before any stage started:\n" + "".join(seen[-30:]))
    workers = children()
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in
                                         Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:1]
                                         for p in workers if Path(f"/proc/{p}/stat").exists()):
        time.sleep(0.5)
    alive = [p for p in workers if Path(f"/proc/{p}/stat").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"worker(s) {alive} still running after the runner got SIGTERM"
    assert not os.path.exists(tmp_path / "s" / "a_full_lr1e-3_s0" / "eval.json")


def test_a_defense_grid_is_not_part_of_a_stage_hash():
    """Editing a defense's `tune:` grid keeps the finished stages of its other points; its arguments do not."""
    from omegaconf import open_dict

    from safety_units.experiments.study.runner import config_hash
    from safety_units.utils.config import compose_config

    cfg = compose_config("train", ["~experiment", "defense=vaccine"])
    before = config_hash({"train": cfg})
    with open_dict(cfg):
        cfg.defense.tune = {"defense.rho": [2.0]}
    assert config_hash({"train": cfg}) == before
    cfg.defense.rho = 0.5
    assert config_hash({"train": cfg}) != before


def test_a_stage_log_gets_the_records_of_its_stage_only(tmp_path):
    import logging

    from safety_units.experiments.study.process import release_memory, stage_log

    log = logging.getLogger("safety_units.test_stage_log")
    log.setLevel(logging.INFO)
    with stage_log(tmp_path / "a.log"):
        log.info("inside the stage")
    log.info("after the stage")
    release_memory()
    text = (tmp_path / "a.log").read_text()
    assert "inside the stage" in text and "after the stage" not in text
