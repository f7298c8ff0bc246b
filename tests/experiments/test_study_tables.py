"""The claim tables of the SSAH study v2 report (safety_units.experiments.study.tables), rebuilt from the shipped cpu
study's artifacts (results/ssah_smollm2_cpu/runs): the same numbers as its summary.json and the same markdown as
results/ssah_smollm2_cpu.md. Section (a) pools ~20 bootstraps over the shipped runs (5 s on 2 cores), too slow for
the suite: the synthetic study of fake_study.py exercises it through the report (test_study_report.py), and
`scripts/run_study.py --report-only` rebuilds it from the shipped runs."""
import json

import pytest
from conftest import ROOT

from safety_units.experiments.study.report import clean
from safety_units.experiments.study.tables import (
    c_table,
    c_threat,
    frozen_share,
    pct,
    section_b,
    stage_field,
    values_cond,
)
from safety_units.experiments.study.verdicts import load_study

SHIPPED = ROOT / "results" / "ssah_smollm2_cpu"


@pytest.fixture(scope="module")
def shipped():
    """(the loaded study, its summary.json, its report's text)."""
    return (load_study(SHIPPED / "runs"), json.loads((SHIPPED / "summary.json").read_text()),
            (ROOT / "results" / "ssah_smollm2_cpu.md").read_text())


def as_json(data):
    return json.loads(json.dumps(clean(data), default=str))  # as the report writes summary.json


def test_section_b_rebuilds_the_shipped_ablation_table(shipped):
    st, summary, md = shipped
    data, lines = section_b(st)
    assert as_json(data) == summary["b"] and "\n".join(lines) in md


def test_one_threat_of_section_c_rebuilds_its_shipped_table(shipped):
    st, summary, md = shipped
    threat = next(t for t in st["plan"]["threats"] if t["key"] == "aoa1")
    data = c_threat(st, threat)
    assert as_json(data) == summary["c"]["aoa1"]
    assert "\n".join(c_table(data)) in md


def test_cell_helpers():
    st = {"runs": {"frozen": {"point": {"train": {"freeze": {"entries": {"frozen_share": 0.25}}}}, "meta": None},
                   "full": {"point": {"train": {"freeze": None}}}, "eval_only": {"point": {"train": None}}}}
    assert stage_field(st, "frozen", "point", "train", "freeze", "entries", "frozen_share") == 0.25
    assert stage_field(st, "frozen", "meta", "ablation") is None and stage_field(st, "absent", "point") is None
    assert [frozen_share(st, s) for s in ("frozen", "full", "eval_only", "absent")] == [0.25, 0.0, None, None]
    c = values_cond([0.2, None, 0.4])
    assert (c["n"], c["mean"], c["sd"]) == (2, pytest.approx(0.3), pytest.approx(0.1414, abs=1e-4))
    assert values_cond([None]) == {"mean": None, "sd": None, "n": 0, "missing": []}
    assert (pct(c), pct(values_cond([0.5])), pct(values_cond([]))) == ("30.00% ± 14.14%", "50.00%", "n/a")
