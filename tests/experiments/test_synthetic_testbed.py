"""Jain et al.'s testbed (safety_units.experiments.synthetic.testbed, scripts/run_jain_testbed.py): the shipped
report rebuilds byte for byte from its testbed.json, the findings recompute from its runs by the fixed criteria,
and the driver runs every objective and the planted ground truth end to end on a small synthetic model."""

import json
import shutil

from conftest import ROOT, load_script
from test_synthetic_model import SMALL

from safety_units.experiments.synthetic.testbed import findings, write_report

SHIPPED = ROOT / "results" / "jain_testbed"


def test_the_shipped_report_rebuilds_byte_for_byte(tmp_path):
    (tmp_path / "jain_testbed").mkdir()
    shutil.copy(SHIPPED / "testbed.json", tmp_path / "jain_testbed")
    assert write_report(tmp_path) == tmp_path / "jain_testbed.md"
    assert (tmp_path / "jain_testbed.md").read_bytes() == (ROOT / "results" / "jain_testbed.md").read_bytes()
    assert (tmp_path / "jain_testbed" / "separation.png").read_bytes() == (SHIPPED / "separation.png").read_bytes()


def test_the_findings_recompute_from_the_shipped_runs():
    data = json.loads((SHIPPED / "testbed.json").read_text())
    base = data["pretrained"]["separation"]
    for objective, shipped in data["findings"].items():
        runs = [r for r in data["runs"].values() if r["objective"] == objective]
        assert len(runs) == 3, objective  # seeds 0, 1, 2
        assert json.loads(json.dumps(findings(runs, base))) == shipped, objective


def test_the_testbed_driver_runs_every_objective_and_writes_the_report(tmp_path):
    load_script("run_jain_testbed").main([
        "--seeds", "0", "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "r"), "--eval-per-group", "8",
        *sum((["--model-set", s] for s in [f"paths.cache_dir={tmp_path}", *SMALL]), []),
        "--set", "data.num_samples=32", "--set", "trainer.max_steps=2", "--set", f"paths.cache_dir={tmp_path}",
        "--set", "freeze=train_only", "--set", "freeze.random_share=0.1", "--scorers", "delta", "wifv"])
    data = json.loads((tmp_path / "r" / "jain_testbed" / "testbed.json").read_text())
    assert set(data["runs"]) == {"sft_s0", "dpo_s0", "unlearning_s0"}
    # each objective fine-tunes the synthetic model with frozen entries exact
    assert all(r["frozen_max_abs_delta"] == 0.0 and r["trainable_changed"] > 0 for r in data["runs"].values())
    assert set(data["findings"]) == {"sft", "dpo", "unlearning"}
    shares = data["runs"]["dpo_s0"]["shares"]["mean_null_space"]
    assert set(shares) == {"gate_proj", "up_proj", "down_proj"} and all(0 <= v <= 1 for v in shares.values())
    md = (tmp_path / "r" / "jain_testbed.md").read_text()
    assert "| unlearning (1 seeds) |" in md and "| dpo |" in md
    # the planted set is 2% of the units (the objectives' freeze.random_share=0.1 does not leak into it), only it
    # changed, and delta's safety rank (the weight change) recovers it exactly: the ground-truth machinery is right
    gt = data["ground_truth"]
    assert gt["frozen_max_abs_delta"] == 0.0 and set(gt["scorers"]) == {"delta", "wifv"}
    assert 0.01 * gt["units"] <= gt["planted_units"] <= 0.03 * gt["units"]
    assert gt["scorers"]["delta"]["safety"]["precision"] == 1.0
    assert gt["scorers"]["wifv"]["safety"]["chance"] == gt["planted_units"] / gt["units"]
    assert "| delta | " in md and "## Ground truth for the scorers" in md
