"""`defense=safeinstr`: SafeInstr (Bianchi et al. 2024, safety-tuned-llamas) mixes a small share of safety examples
(harmful prompts with refusals) into the user's fine-tuning data."""

from __future__ import annotations

from safety_units.defenses.base import Defense
from safety_units.utils.errors import ConfigError


class SafeInstr(Defense):
    """Adds `source` to data.sources, weighted so that it makes up `share` (~3%) of data.num_samples whatever the
    other sources' weights are."""

    def __init__(self, name: str = "safeinstr", stage: str = "finetune", share: float = 0.03,
                 source: dict | None = None):
        super().__init__(name, stage)
        self.share, self.source = float(share), source
        if not 0 < self.share < 1:
            raise ConfigError(f"defense.share must be in (0, 1), got {self.share}.")
        if not source:
            raise ConfigError(f"defense.source: defense={name} needs its safety data source.")

    def extra_sources(self, data) -> dict[str, dict]:
        if data.get("num_samples") is None:
            raise ConfigError(f"defense={self.name} needs data.num_samples (its share is a share of the sampled "
                              f"data).")
        others = sum(float(s.get("weight", 1.0)) for s in data.sources.values())
        return {"safeinstr": {**self.source, "weight": self.share / (1 - self.share) * others}}
