"""What `python evaluate.py` runs (safety_units.evaluation.run): the reports and loggers, unit ablation."""
import json

import pytest
from conftest import compose

from safety_units.evaluation.run import run_evaluate
from safety_units.utils.errors import ConfigError


def test_evaluate_entry_writes_reports(tmp_path):
    cfg = compose("evaluate", ["model=tiny", "eval=suite", "eval.limit=4", "eval.max_new_tokens=8", "logger=many",
                               "eval.log_completions=3"], output_dir=tmp_path)
    out = run_evaluate(cfg)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"harmful", "malicious_instructions", "q_harm", "oktest", "harmless", "mmlu/acc", "ppl"}
    assert all(r["n"] == 4 and len(r["extra"]["outcomes"]) == 4 and r["extra"]["prompt_hash"] for r in report.values())
    assert report["harmful"]["metric"] == "asr" and report["harmful"]["extra"]["overlaps_removed"] == 0
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {"prompt", "completion", "refusal", "task"} <= set(json.loads(lines[0]))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert out["meta"]["ablation"] is None
    # logger=many: the params in eval_meta.json, params.json and the CSV logger's hparams.yaml; wandb's run (read
    # back with wandb's reader) holds them, the summary and one completions table per refusal task
    from spies import read_wandb_run

    params = json.loads((tmp_path / "eval_meta.json").read_text())["params"]
    assert params["eval.limit"] == 4 and params["model._target_"].endswith("build_tiny") and "git.commit" in params
    assert json.loads((tmp_path / "params.json").read_text()) == params
    assert "eval.limit: 4" in (tmp_path / "csv" / "hparams.yaml").read_text()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    got = read_wandb_run(run)
    assert got["config"]["eval.limit"] == 4 and got["summary"]["eval/harmful/asr"] == report["harmful"]["value"]
    tables = {k.split(".")[0] for k, v in got["history"].items() if k.endswith("._type") and v == "table-file"}
    assert tables == {f"completions/{t}" for t in ("harmful", "malicious_instructions", "q_harm", "oktest",
                                                     "harmless")}


def test_evaluate_ablation_and_random_control(tmp_path):
    from safety_units.attribution.pipeline import run_attribution

    um = run_attribution(compose("attribute", ["model=tiny", "calibration.nsamples=8", "calibration.max_length=48"],
                                 output_dir=tmp_path / "map"))["unit_map"]
    base = ["model=tiny", "eval=ppl", "eval.limit=4", f"ablate.unit_map={um}"]
    esu = run_evaluate(compose("evaluate", base + ["ablate.classes=[esu]"], output_dir=tmp_path / "esu"))
    rnd = run_evaluate(compose("evaluate", base + ["ablate.random_like=esu", "ablate.seed=1"],
                               output_dir=tmp_path / "rnd"))
    assert esu["meta"]["ablation"]["units"] == rnd["meta"]["ablation"]["units"]
    assert esu["meta"]["ablation"]["units"]["mlp"]["units"] == round(0.013 * 256)
    with pytest.raises(ConfigError, match="exactly one"):
        run_evaluate(compose("evaluate", base + ["ablate.classes=[esu]", "ablate.random_like=esu"],
                             output_dir=tmp_path / "bad"))
