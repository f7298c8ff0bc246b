"""The plots of the SSAH study v2 report (safety_units.experiments.study.plots), redrawn from the section data of the
shipped summaries: the same plots, byte for byte, and none where a study has no data for one (the gpu study ran
only claim a's stages to the end)."""
import json

import pytest
from conftest import ROOT

from safety_units.experiments.study.plots import plot_a_frontier, plot_c_strength, plot_c_utility, write_plots

RESULTS = ROOT / "results"


def summary(name: str) -> dict:
    return json.loads((RESULTS / name / "summary.json").read_text())


def test_the_gpu_study_draws_only_the_plot_it_has_data_for(tmp_path):
    made = write_plots(summary("ssah_smollm2")["a"], summary("ssah_smollm2")["c"], tmp_path)
    assert made == summary("ssah_smollm2")["plots"] == {"a_frontier": "a_frontier.png"}
    assert [p.name for p in tmp_path.iterdir()] == ["a_frontier.png"]
    assert (tmp_path / "a_frontier.png").read_bytes() == (RESULTS / "ssah_smollm2" / "a_frontier.png").read_bytes()


DRAW = {"a_frontier": lambda data, path: plot_a_frontier(data["a"], path),
        "c_asr_vs_utility_benign": lambda data, path: plot_c_utility(data["c"], "benign", path)}


@pytest.mark.parametrize("plot", sorted(DRAW))
def test_the_cpu_studys_plots_redraw_byte_for_byte(tmp_path, plot):
    """One plot of each kind with a fixed label (write_plots draws all six: 5 s on 2 cores; the strength plots are
    drawn from the synthetic study in test_study_report.py)."""
    path = tmp_path / f"{plot}.png"
    assert DRAW[plot](summary("ssah_smollm2_cpu"), path) == path
    assert path.read_bytes() == (RESULTS / "ssah_smollm2_cpu" / f"{plot}.png").read_bytes()


def test_no_data_no_plot(tmp_path):
    empty = {"mean": None, "sd": None, "n": 0, "missing": []}
    a = {"rows": [{"method": "full", "lr": "5e-5", "oktest": empty, "harmful": empty}],
         "shipped": {"oktest": None, "harmful": None}}
    assert plot_a_frontier(a, tmp_path / "a.png") is None
    assert plot_c_strength({}, "aoa", tmp_path / "c.png", "epochs") is None
    assert list(tmp_path.iterdir()) == []
