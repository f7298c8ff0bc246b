"""`defense=safeinstr`: SafeInstr (Bianchi et al. 2024, safety-tuned-llamas) mixes a small share of safety examples
(harmful prompts with refusals) into the user's fine-tuning data."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from safety_units.defenses.base import Defense
from safety_units.utils.errors import ConfigError


def mix_counts(weights: dict[str, float], num_samples: int) -> dict[str, int]:
    """Examples per source of data.num_samples split by weight, as SFTDataModule._apply_mix draws them:
    round(num_samples * weight / total weight)."""
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("data source weights must sum to a positive number.")
    return {name: int(round(num_samples * w / total)) for name, w in weights.items()}


class SafeInstr(Defense):
    """round(`share` * data.num_samples) safety examples (`source`) replace as many examples of the `replaces` source
    (data=task_mix: `task`), so every other source keeps the count it has without the defense (the harmful pairs stay
    round(p * n)) and the total stays n. The sources get their exact counts as weights (SFTDataModule._apply_mix then
    draws exactly those counts); a `replaces` source with too few examples left is an error."""

    def __init__(self, name: str = "safeinstr", stage: str = "finetune", share: float = 0.03,
                 source: dict | None = None, replaces: str = "task"):
        super().__init__(name, stage)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ConfigError(f"defense.share must be a number in (0, 1), got {share!r}.")
        if not source:
            raise ConfigError(f"defense.source: defense={name} needs its safety data source.")
        if not isinstance(replaces, str) or not replaces:
            raise ConfigError(f"defense.replaces must name a data source (e.g. task), got {replaces!r}.")
        self.share, self.source, self.replaces = float(share), source, replaces

    def extra_sources(self, data) -> dict[str, dict]:
        """The safety source and every data source re-weighted to its count (fit merges them into data.sources)."""
        n = data.get("num_samples")
        if n is None:
            raise ConfigError(f"defense={self.name} needs data.num_samples (its share is a share of the sampled "
                              f"data).")
        sources = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else dict(v)
                   for k, v in data.sources.items()}
        if self.replaces not in sources:
            raise ConfigError(f"defense.replaces={self.replaces!r} is not a source of this data config (data.sources: "
                              f"{sorted(sources)}); name the source the safety examples replace, e.g. "
                              f"defense.replaces={next(iter(sources), 'task')}.")
        counts = mix_counts({k: float(s.get("weight", 1.0)) for k, s in sources.items()}, int(n))
        k = int(round(self.share * int(n)))
        counts[self.replaces] += int(n) - sum(counts.values()) - k  # the total stays n, rounding included
        if counts[self.replaces] < 0:
            raise ConfigError(f"defense.share={self.share}: {k} safety examples of data.num_samples={n} are more than "
                              f"the examples of data.sources.{self.replaces} (defense.replaces) can give up.")
        out = {name: {**s, "weight": float(counts[name])} for name, s in sources.items()}
        return {**out, "safeinstr": {**self.source, "weight": float(k)}}
