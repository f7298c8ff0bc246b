"""Unit drift during training (`callbacks=drift`): do units change class while the model trains?

At step 0, every `every_n_steps` optimizer steps and at the end, the callback re-scores every unit on a small fixed
calibration slice (the safety and utility sets, `calibration.nsamples` each, drawn once) with a forward-only scorer
(wifv or activation, safety_units.attribution.scoring), classifies the scores with the run's classify settings and compares the
classes with those of step 0:

* per class c: IoU of the step-0 set of c with the current set of c, and `retained` = the share of the step-0 units
  of c still in c;
* the 4x4 transition matrix T[a][b]: units in class a at step 0 and in class b now (ESU -> CU, ...).

Logged to the run's loggers (`drift/{c}_iou`, `drift/{c}_retained`, `drift/{a}_to_{b}` as a share of row a),
rewritten to `<run dir>/drift.json` after each measurement and plotted at the end (`drift.png`). The classify
settings are the run's unit map's (when the run freezes by one and `classify_from_unit_map`), else
`callbacks.drift.classify`. Scores use the weight each unit writes through -- with `adapter=lora` that includes the
adapter's dW. Rank 0 measures; no RNG is drawn, so training is unchanged. Skipped under weight-sharded strategies
(ZeRO-3, FSDP), where no rank holds the whole model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from safety_units.data.calibration import calibration_batches
from safety_units.models.sharded import weights_sharded
from safety_units.units.classification import CLASS_CODES, classify_from_config
from safety_units.utils.errors import ConfigError
from safety_units.models.lora import effective_weight
from safety_units.utils.ranks import RankedLogger
from safety_units.attribution.scoring import TOKENS
from safety_units.attribution.one_set import score_units
from safety_units.units.groups import UnitGroup, resolve_units

log = RankedLogger(__name__)

CLASSES = ("esu", "euu", "cu", "ru")
FORWARD_SCORERS = ("wifv", "activation")


def applied_weight_groups(model, names: dict | None = None) -> list[UnitGroup]:
    """The model's unit groups with each out weight replaced by the weight the module applies (W + LoRA dW)."""
    groups = []
    for g in resolve_units(model, names):
        if hasattr(g.out_module, "weight"):  # experts' 3-D tensors carry no adapter: their own weight
            g = dataclasses.replace(g, out_weight=dataclasses.replace(g.out_weight,
                                                                      param=effective_weight(g.out_module)))
        groups.append(g)
    return groups


def compare_classes(start: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> dict:
    """IoU, retained share per class (None where undefined) and transition counts, over all units pooled."""
    keys = sorted(start)
    a = torch.cat([start[k].flatten() for k in keys])
    b = torch.cat([now[k].flatten() for k in keys])
    iou, retained, transitions = {}, {}, []
    for x in CLASSES:
        in_a = a == CLASS_CODES[x]
        transitions.append([int((in_a & (b == CLASS_CODES[y])).sum()) for y in CLASSES])
        in_b = b == CLASS_CODES[x]
        both, union = int((in_a & in_b).sum()), int((in_a | in_b).sum())
        iou[x] = both / union if union else None
        retained[x] = both / int(in_a.sum()) if in_a.any() else None
    return {"iou": iou, "retained": retained, "transitions": transitions}


def drift_metrics(record: dict) -> dict[str, float]:
    """The logger metrics of one measurement (undefined values left out)."""
    out = {}
    for x in CLASSES:
        for what in ("iou", "retained"):
            if record[what][x] is not None:
                out[f"drift/{x}_{what}"] = record[what][x]
    for i, x in enumerate(CLASSES):
        row = record["transitions"][i]
        if sum(row):
            out.update({f"drift/{x}_to_{y}": v / sum(row) for y, v in zip(CLASSES, row)})
    return out


class UnitDrift(pl.Callback):
    def __init__(self, output_dir: str, calibration, classify, every_n_steps: int = 25, method: str = "wifv",
                 tokens: str = "all", seed: int = 0, classify_from_unit_map: bool = True,
                 cache_dir: str | None = None, unit_names=None):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"callbacks.drift.every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        if method not in FORWARD_SCORERS:
            raise ConfigError(f"callbacks.drift.method must be a forward-only scorer, one of {FORWARD_SCORERS}, "
                              f"got {method!r}.")
        if tokens not in TOKENS:
            raise ConfigError(f"callbacks.drift.tokens must be one of {TOKENS}, got {tokens!r}.")
        self.output_dir = Path(output_dir)
        self.calibration, self.classify = calibration, classify
        self.every_n_steps, self.method, self.tokens, self.seed = every_n_steps, method, tokens, int(seed)
        self.classify_from_unit_map, self.cache_dir = classify_from_unit_map, cache_dir
        self.names = OmegaConf.to_container(unit_names, resolve=True) if unit_names else None
        self.start: dict[str, torch.Tensor] | None = None  # step-0 classes (kept in checkpoints)
        self.records: list[dict] = []
        self.batches: dict[str, list[dict]] = {}
        self.settings: dict = {}
        self.active = False

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer, pl_module):
        self.active = trainer.is_global_zero and not weights_sharded(trainer.strategy)
        if trainer.is_global_zero and not self.active:
            log.warning("callbacks.drift: weights are sharded under %s; unit drift is not measured",
                        type(trainer.strategy).__name__)
        if not self.active:
            return
        cal = self.calibration
        self.batches = {which: calibration_batches(pl_module.tokenizer, cal[which], int(cal.nsamples),
                                                   int(cal.max_length), int(cal.batch_size), self.seed, which,
                                                   model=pl_module.model, cache_dir=self.cache_dir)
                        for which in ("safety", "utility")}
        self.settings = OmegaConf.to_container(self.classify, resolve=True)
        if self.classify_from_unit_map and pl_module.unit_map is not None:
            self.settings = pl_module.unit_map.metadata.get("classify", self.settings)

    def on_train_start(self, trainer, pl_module):
        if self.active and self.start is None:  # a resumed run keeps the step-0 classes of its checkpoint
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.active and step % self.every_n_steps == 0 and not self._measured(step):
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if not self.active or not self.records:
            return
        if not self._measured(trainer.global_step):
            self._measure(trainer, pl_module)
        from safety_units.utils.plots import plot_drift  # matplotlib only where a plot is drawn

        plot_drift(self.records, list(CLASSES), self.output_dir / "drift.png",
                   title=f"unit drift ({self.method}, {int(self.calibration.nsamples)} samples per set)")

    # ------------------------------------------------------------------ measuring
    def _measured(self, step: int) -> bool:
        return bool(self.records) and self.records[-1]["step"] == step

    def classes_now(self, model) -> dict[str, torch.Tensor]:
        groups = applied_weight_groups(model, self.names)
        scores = {which: score_units(model, groups, batches, self.method, tokens=self.tokens, progress=False,
                                     desc=f"drift {which}")
                  for which, batches in self.batches.items()}
        return classify_from_config(scores["safety"], scores["utility"], self.settings)

    def _measure(self, trainer, pl_module) -> None:
        classes = self.classes_now(pl_module.model)
        if self.start is None:
            self.start = classes
        record = {"step": trainer.global_step} | compare_classes(self.start, classes)
        self.records.append(record)
        for lg in trainer.loggers:
            lg.log_metrics(drift_metrics(record), step=trainer.global_step)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "drift.json").write_text(json.dumps({
            "classes": list(CLASSES), "method": self.method, "tokens": self.tokens,
            "nsamples": int(self.calibration.nsamples), "every_n_steps": self.every_n_steps,
            "classify": self.settings, "records": self.records}, indent=2))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        start = {k: v.tolist() for k, v in self.start.items()} if self.start is not None else None
        return {"start": start, "records": self.records}

    def load_state_dict(self, state: dict) -> None:
        if state.get("start") is not None:
            self.start = {k: torch.tensor(v, dtype=torch.uint8) for k, v in state["start"].items()}
        self.records = list(state.get("records", []))
