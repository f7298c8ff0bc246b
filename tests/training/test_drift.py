"""callbacks=drift: units re-scored and re-classified during training, compared with their step-0 classes."""
import csv
import json

import pytest
import torch
from conftest import train_cfg
from testkit import EXACT

from safety_units.units.classification import CLASS_CODES
from safety_units.utils.config import instantiate
from safety_units.training.drift import CLASSES, compare_classes, drift_metrics
from safety_units.utils.errors import ConfigError
from safety_units.training.fit import run_train

DRIFT = ["callbacks=drift", "callbacks.drift.every_n_steps=2", "callbacks.drift.calibration.nsamples=8",
         "callbacks.drift.calibration.max_length=64"]


def _codes(*names):
    return torch.tensor([CLASS_CODES[n] for n in names], dtype=torch.uint8)


def test_compare_classes_counts_transitions_and_iou():
    start = {"mlp.0": _codes("esu", "esu", "cu", "ru"), "attn.0": _codes("euu", "cu")}
    now = {"mlp.0": _codes("esu", "cu", "cu", "ru"), "attn.0": _codes("cu", "cu")}
    rec = compare_classes(start, now)
    assert rec["transitions"] == [[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 1]]  # rows: esu euu cu ru
    assert rec["iou"] == {"esu": 0.5, "euu": 0.0, "cu": 0.5, "ru": 1.0}
    assert rec["retained"] == {"esu": 0.5, "euu": 0.0, "cu": 1.0, "ru": 1.0}
    assert drift_metrics(rec)["drift/esu_to_cu"] == 0.5
    same = compare_classes(start, start)
    assert all(v == 1.0 for v in same["iou"].values())


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_drift_writes_json_plot_and_metrics(tmp_path, adapter):
    run_train(train_cfg(tmp_path, *EXACT, *DRIFT, f"adapter={adapter}", "trainer.max_steps=5"))
    data = json.loads((tmp_path / "drift.json").read_text())
    records = data["records"]
    assert [r["step"] for r in records] == [0, 2, 4, 5]  # every 2 steps, and the end
    first = records[0]
    assert all(first["iou"][c] == 1.0 and first["retained"][c] == 1.0 for c in CLASSES)
    assert all(first["transitions"][i][j] == 0 for i in range(4) for j in range(4) if i != j)
    assert all(sum(map(sum, r["transitions"])) == 256 + 128 for r in records)  # every unit of the tiny model
    assert data["method"] == "wifv" and data["classify"]["method"] == "shares"
    assert (tmp_path / "drift.png").stat().st_size > 0
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("drift/esu_iou")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5] and float(rows[0]["drift/esu_iou"]) == 1.0


def test_drift_resumes_with_its_step0_classes(tmp_path):
    common = [*EXACT, *DRIFT, "trainer.max_steps=6", "adapter=lora", "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    run_train(train_cfg(tmp_path / "a", *common))
    run_train(train_cfg(tmp_path / "b", *common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'step000003.ckpt'}"))
    a = json.loads((tmp_path / "a" / "drift.json").read_text())["records"]
    b = json.loads((tmp_path / "b" / "drift.json").read_text())["records"]
    assert [r["step"] for r in b] == [0, 2, 4, 6] and b == a


@pytest.mark.parametrize("override,match", [
    ("callbacks.drift.every_n_steps=0", r"callbacks.drift.every_n_steps must be an integer >= 1"),
    ("callbacks.drift.method=snip", r"callbacks.drift.method must be a forward-only scorer"),
])
def test_drift_config_errors_name_the_key(tmp_path, override, match):
    cfg = train_cfg(tmp_path, "callbacks=drift", override)
    with pytest.raises(ConfigError, match=match):
        instantiate(cfg.callbacks.drift, "callbacks.drift")


def test_drift_leaves_training_unchanged(tmp_path):
    """Measuring draws no random numbers and restores train mode: LoRA dropout sees the same masks."""
    from safetensors.torch import load_file

    common = [*EXACT, "adapter=lora"]
    run_train(train_cfg(tmp_path / "plain", *common))
    run_train(train_cfg(tmp_path / "drift", *common, *DRIFT, "callbacks.drift.every_n_steps=1"))
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "drift" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
