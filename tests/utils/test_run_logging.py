"""What a run tells its loggers (safety_units.utils.run_logging): the resolved config as flat params plus the run's
facts, params.json and summary.json in the run dir, numbers to non-wandb loggers, images to wandb only, and the
logging's own time counted once."""
import csv
import json
import re
import time
from types import SimpleNamespace

import pytest
from conftest import FIXTURES, ROOT
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from safety_units.units.unit_map import UnitMap
from safety_units.utils.fingerprints import fingerprint_key
from safety_units.utils.run_logging import (
    Stopwatch,
    flat,
    git_state,
    log_images,
    log_params,
    run_params,
    set_summary,
)


class WandbLogger:
    """A stand-in told apart by its class name, as utils.config.wandb_loggers does: records what it is sent."""

    def __init__(self):
        self.experiment = SimpleNamespace(summary={})
        self.images = []

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def csv_rows(logger: CSVLogger) -> list[dict]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_flat_dots_nested_keys_and_keeps_lists_and_empty_dicts():
    assert flat({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": {},
                                                                           "f": None}
    assert flat(None) == {}


def test_git_state_of_a_checkout_and_outside_one(tmp_path):
    inside = git_state(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", inside["git.commit"]) and isinstance(inside["git.dirty"], bool)
    assert git_state(tmp_path) == {"git.commit": None, "git.dirty": None}


def test_run_params_flatten_the_resolved_config_and_add_the_runs_facts(tmp_path):
    cfg = OmegaConf.create({"seed": 3, "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "paths": {"root_dir": str(tmp_path)},
                            "scheduler": {"peak_lr": "${optim.lr}"}})
    assert run_params(cfg) == {"seed": 3, "optim.lr": 1e-3, "optim.betas": [0.9, 0.99],
                               "paths.root_dir": str(tmp_path), "scheduler.peak_lr": 1e-3,  # resolved
                               "git.commit": None, "git.dirty": None}
    um = UnitMap.load(FIXTURES / "unit_map_channels_v9a1b3aa_tiny.safetensors")
    freeze = {"entries": {"frozen": 10, "trainable": 90, "frozen_share": 0.1, "trainable_share": 0.9}}
    params = run_params(cfg, unit_map=um, freeze=freeze, adapter={"rank": 8})
    assert params["unit_map.path"] == str(um.path)
    assert params["unit_map.fingerprint"] == fingerprint_key(um.metadata["fingerprint"])
    assert params["unit_map.share.all.esu"] == um.summary()["total"]["all"]["esu"]["share"]
    assert {k for k in params if k.startswith("unit_map.share.")} == {
        f"unit_map.share.{kind}.{c}" for kind in ("mlp", "attn", "all") for c in ("esu", "euu", "cu", "ru")}
    assert (params["freeze.entries_frozen"], params["freeze.entries_trainable"], params["freeze.frozen_share"],
            params["adapter.lora_rank"]) == (10, 90, 0.1, 8)
    assert "freeze.entries_frozen" not in run_params(cfg, freeze={"entries": None})  # freeze=none: no entries


def test_log_params_reach_every_logger_and_params_json(tmp_path):
    params = {"optim.lr": 1e-3, "optim.betas": [0.9, 0.99], "freeze.strategy": "esu", "git.commit": None}
    logger = CSVLogger(tmp_path, name="csv")
    log_params([logger], params, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "params.json").read_text()) == params
    logger.save()
    assert OmegaConf.load(f"{logger.log_dir}/hparams.yaml")["freeze.strategy"] == "esu"
    log_params(None, params)  # no loggers, no run dir: nothing to do


def test_set_summary_gives_wandb_everything_other_loggers_the_numbers(tmp_path):
    summary = {"eval/harmful/asr/after": 0.25, "train/global_step": 4, "train/tokens_per_s": None,
               "freeze/trainable_changed": True, "judge": "patterns"}
    wandb, logger = WandbLogger(), CSVLogger(tmp_path, name="csv")
    set_summary([wandb, logger], summary, tmp_path / "run", step=4)
    assert wandb.experiment.summary == summary
    [row] = csv_rows(logger)  # numbers only: no None, bool or string
    assert {k: float(v) for k, v in row.items() if v != ""} == {"eval/harmful/asr/after": 0.25,
                                                                "train/global_step": 4.0, "step": 4.0}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_images_go_to_wandb_as_written_and_missing_ones_are_skipped(tmp_path):
    png = tmp_path / "units.png"
    png.write_bytes(b"\x89PNG")
    images = {"plots/units": png, "plots/drift": tmp_path / "drift.png", "plots/none": None}
    wandb = WandbLogger()
    assert log_images([wandb, CSVLogger(tmp_path)], images, step=2) == 1
    assert wandb.images == [("plots/units", [str(png)], 2)]
    assert log_images([CSVLogger(tmp_path)], images) == 0  # other loggers get no images


def test_stopwatch_counts_nested_logging_once():
    before = Stopwatch.total
    t0 = time.perf_counter()
    with Stopwatch():
        with Stopwatch():
            assert Stopwatch.depth == 2
            time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    assert Stopwatch.depth == 0
    assert 0.05 <= Stopwatch.total - before <= elapsed  # twice 0.05 if the inner call were counted too
    with pytest.raises(ValueError), Stopwatch():
        raise ValueError("the logging failed")
    assert Stopwatch.depth == 0  # an exception does not leave the watch running
