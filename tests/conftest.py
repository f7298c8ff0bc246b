import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
FIXTURES = Path(__file__).parent / "fixtures"

import safety_units  # noqa: E402,F401  (registers the configs' OmegaConf resolvers, as every entry point does)
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_script(name: str):
    """A module of scripts/ (command-line entry points live there, not in the package), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose(config_name: str, overrides: list[str], output_dir: Path | None = None):
    """Compose a config with Hydra's compose API, as the entry points would (output_dir replaces the run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny():
    from safety_units.models.loading import build_tiny

    cache = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
    return build_tiny(cache_dir=cache)


@pytest.fixture(scope="session")
def tokenizer():
    from safety_units.models.loading import smollm2_tokenizer

    cache = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
    return smollm2_tokenizer(cache)


def tiny_unit_map(out: Path) -> str:
    """A unit map of model=tiny (16 calibration samples of 64 tokens), attributed into `out`."""
    from safety_units.attribution.pipeline import run_attribution

    cfg = compose("attribute", ["model=tiny", "calibration.nsamples=16", "calibration.max_length=64"], output_dir=out)
    return run_attribution(cfg)["unit_map"]


@pytest.fixture(scope="session")
def unit_map(tmp_path_factory):
    """One tiny-model unit map shared by every test that freezes or ablates by classes (read-only)."""
    return tiny_unit_map(tmp_path_factory.mktemp("map"))


TINY_TRAIN = ["~experiment", "model=tiny", "logger=csv", "data=alpaca", "data.num_samples=48", "data.max_length=64",
              "data.batch_size=4", "data.val_fraction=0.1", "trainer.max_steps=4", "callbacks=none",
              "trainer.enable_progress_bar=false"]


def train_cfg(tmp_path, *overrides):
    return compose("train", TINY_TRAIN + list(overrides), output_dir=tmp_path)
