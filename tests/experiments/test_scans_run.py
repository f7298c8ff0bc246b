"""The SCANS runs' plan (safety_units.experiments.scans.run): the command line's model and unit-map items, each
model's conditions, a model's provenance. The runs themselves: tests/steering/test_scans.py (scripts/run_scans.py
on a tiny model)."""
import pytest

from safety_units.experiments.scans.run import conditions, name_paths, provenance, run_scans, unit_maps
from safety_units.utils.errors import ConfigError


def test_models_and_unit_maps_are_parsed_with_clear_errors():
    models = name_paths(["aligned=logs/a/model", "ru=logs/r=x"], "--model")
    assert models == {"aligned": "logs/a/model", "ru": "logs/r=x"}
    with pytest.raises(ConfigError, match="--model 'aligned': expected NAME=PATH"):
        name_paths(["aligned"], "--model")
    assert unit_maps(["ru:wifv=m1", "ru:mask=m2"], models) == {"ru": {"wifv": "m1", "mask": "m2"}}
    with pytest.raises(ConfigError, match="expected MODEL:LABEL=PATH"):
        unit_maps(["ru=m1"], models)
    with pytest.raises(ConfigError, match="no --model named 'other'"):
        unit_maps(["other:wifv=m1"], models)
    with pytest.raises(ConfigError, match="at least one --model"):
        run_scans({}, {}, [4.0], "all", None, False, [], None, "scans")


def test_the_first_model_runs_every_alpha_and_the_others_the_chosen_one():
    first = conditions(True, "first", [4.0, 8.0])
    assert list(first) == ["none", "refusal_ablation", "scans_a4", "scans_a8"]
    assert first["scans_a8"] == ("scans", 8.0, ["steer=scans", "steer.alpha=8.0"])
    assert list(conditions(False, "first", [8.0])) == ["none", "scans_a8"]  # ablation only on the first
    assert list(conditions(False, "all", [8.0])) == ["none", "refusal_ablation", "scans_a8"]


def test_provenance_reads_the_exported_config(tmp_path):
    assert provenance(str(tmp_path)).startswith("unknown")
    (tmp_path / "safety_units_config.yaml").write_text(
        "data: {name: mix, num_samples: 480}\nfreeze: {strategy: ru_only}\noptim: {lr: 0.0002}\n"
        "trainer: {max_epochs: 1}\nseed: 3\n")
    assert provenance(str(tmp_path)) == "data=mix n=480, freeze=ru_only, lr=0.0002, epochs=1, seed=3"
