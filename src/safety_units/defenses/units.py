"""The unit-level defenses: `defense=esu | esu_cu | layers | random` (fine-tune with that freeze= strategy) and
`defense=sn_tune` (SN-Tune-style re-alignment: train only the safety units, freeze=train_esu). Their YAML selects the
freeze config (`defaults: - override /freeze@_global_.freeze: <strategy>`); the strategies themselves are in
safety_units.training.freezing and safety_units.attribution.selection."""

from __future__ import annotations

from safety_units.defenses.base import Defense
from safety_units.utils.errors import ConfigError


class UnitFreeze(Defense):
    """A defense that is a freeze= strategy: the run must freeze with `freeze_strategy`."""

    def __init__(self, name: str, freeze_strategy: str, stage: str = "finetune"):
        super().__init__(name, stage)
        self.freeze_strategy = freeze_strategy

    def check_run(self, cfg) -> None:
        strategy = cfg.freeze.strategy if cfg.get("freeze") is not None else "none"
        if strategy != self.freeze_strategy:
            raise ConfigError(f"defense={self.name} freezes with freeze={self.freeze_strategy}, but freeze.strategy "
                              f"is {strategy!r} (a freeze= override after defense=?); drop one of them.")
