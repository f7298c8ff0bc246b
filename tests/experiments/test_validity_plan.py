"""The validity harness's plan (scripts/run_attribution_validity.py): the commands of its lanes, resumability, the
mask_logit run starting from its twin's state, and a failing lane stopping the lanes that wait for it. The runner is
a fake that writes what each command would; the report lane is tested in test_validity.py."""
from pathlib import Path

import pytest

from safety_units.experiments.validity.plan import HEADS, NEW, OLD, SCORERS, Harness, Settings, StepFailed


def run_dir(cmd: list[str]) -> Path:
    return Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])


class FakeRunner:
    """Records each command (with whether a resumed mask state was there) and writes its outputs."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __call__(self, cmd: list[str], log: Path) -> int:
        if self.fail and any(self.fail in c for c in cmd):
            return 1
        if cmd[1] == "attribute.py":
            d = run_dir(cmd)
            self.calls.append((cmd, (d / "mask_state.pt").is_file()))
            d.mkdir(parents=True, exist_ok=True)
            for name in ("unit_map.safetensors", "mask_units.safetensors", "mask_state.pt"):
                (d / name).write_text(str(d))
        else:
            self.calls.append((cmd, False))
        return 0


@pytest.fixture
def harness(tmp_path):
    s = Settings(aligned=tmp_path / "align" / "model", planted=tmp_path / "planted" / "model", work=tmp_path / "v",
                 results=tmp_path / "results" / "attribution_validity", python="py", poll_s=0.01, settle_s=0.0)
    s.aligned.mkdir(parents=True)
    (s.aligned / "model.safetensors").write_text("")
    s.planted.mkdir(parents=True)
    (s.planted / "trained_units.safetensors").write_text("")
    return s


def test_the_scorers_are_attributions_scorer_runs_at_the_harness_settings():
    from safety_units.attribution.pipeline import SCORER_RUNS

    assert set(SCORER_RUNS) <= set(SCORERS) and set(OLD) | set(NEW) <= set(SCORERS)
    assert SCORERS["mask"] == [*SCORER_RUNS["mask"], "calibration.batch_size=4"]
    assert SCORERS["mask_logit"] == [*SCORERS["mask"], "scoring.utility=none"]
    assert HEADS["atp_heads"] == [*SCORER_RUNS["atp"], "units.heads=true"]


def test_the_maps_lane_attributes_every_map_once_and_resumes(harness):
    runner = FakeRunner()
    Harness(harness, runner).lane_maps()
    v = harness.work
    dirs = [run_dir(cmd) for cmd, _ in runner.calls]
    assert len(dirs) == len(set(dirs)) == 2 * len(NEW) + len(HEADS) + 10 + 3 + len(OLD) + len(harness.sparsity)
    first, _ = runner.calls[0]
    assert first == ["py", "attribute.py", "model=hf", f"model.path={harness.aligned}", "calibration.nsamples=128",
                     "calibration.max_length=192", "scoring=mask", "calibration.batch_size=4", "logger=none",
                     f"hydra.run.dir={v / 'maps' / 'mask'}"]
    by_dir = {run_dir(cmd): (cmd, resumed) for cmd, resumed in runner.calls}
    assert by_dir[v / "maps" / "mask_logit"][1] and not by_dir[v / "maps" / "mask"][1]  # the twin's state, copied
    assert by_dir[v / "stability" / "shipped"][0][2] == "model=smollm2_135m"
    assert "+calibration.safety.hash_split=[0.5,1.0]" in by_dir[v / "stability" / "atp_half_b"][0]
    assert f"model.path={harness.planted}" in by_dir[v / "planted" / "delta"][0]
    again = FakeRunner()
    Harness(harness, again).lane_maps()
    assert again.calls == []  # every map exists: nothing runs


def test_a_failing_lane_names_its_log_and_stops_the_lanes_waiting_for_it(harness):
    runner = FakeRunner(fail="maps/mask")
    with pytest.raises(StepFailed, match=r"attribution failed: .*maps/mask\.log"):
        Harness(harness, runner).run(["maps", "regen"])  # regen waits for the maps lane's last sparsity map
    assert runner.calls == []
