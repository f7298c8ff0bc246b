"""Small helpers around Hydra configs: instantiate with clear errors, callbacks/loggers from config groups."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safety_units.utils.errors import ConfigError, SafetyUnitsError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


def instantiate(cfg, key: str, **kwargs):
    """hydra.utils.instantiate, turning a bad key or argument into a ConfigError that names the config key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, SafetyUnitsError):
            raise cause from None
        raise ConfigError(f"config '{key}' could not be instantiated: {e}") from None


def instantiate_group(cfg: DictConfig | None, key: str, **kwargs) -> list:
    """Instantiate every entry with a _target_ of a dict-of-configs group (callbacks, logger)."""
    out = []
    if not cfg:
        return out
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"{key}.{name} must be a config with a _target_, got {entry!r}.")
        out.append(instantiate(entry, f"{key}.{name}", **kwargs))
    return out


def wandb_loggers(loggers) -> list:
    """The WandbLogger instances among `loggers` (by class name: no wandb import where none is configured)."""
    return [lg for lg in loggers or [] if type(lg).__name__ == "WandbLogger"]


def finish_loggers(loggers) -> None:
    """One wandb run per job: close it so a multirun's next job starts a fresh one (also after a failure)."""
    if wandb_loggers(loggers):
        import wandb  # only where a wandb logger exists: wandb is slow to import

        wandb.finish()


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def output_dir(cfg: DictConfig) -> Path:
    d = Path(cfg.paths.output_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def setup_run(cfg: DictConfig) -> None:
    """Seeds, thread-friendly defaults and a quiet transformers before any heavy work."""
    import lightning.pytorch as pl

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """A top-level config (train / attribute / evaluate) composed with overrides, inside a running Hydra app or on
    its own (scripts, nested attribution)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    conf_dir = Path(__file__).resolve().parents[3] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        return compose(config_name=config_name, overrides=overrides)
