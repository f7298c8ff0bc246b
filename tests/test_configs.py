"""Every config group option composes (Hydra compose API), and the defaults are what the README says."""
from pathlib import Path

import pytest
from conftest import ROOT, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


TRAIN_GROUPS = ["model", "data", "optim", "freeze", "adapter", "units", "trainer", "logger", "callbacks", "debug",
                "hparams_search"]


@pytest.mark.parametrize("group,option", [(g, o) for g in TRAIN_GROUPS for o in options(g)])
def test_train_group_option_composes(group, option, tmp_path):
    cfg = compose("train", [f"{group}={option}"], output_dir=tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.paths.data_dir.endswith("shared/data")


def experiments() -> list[str]:
    return sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml")
                  if not p.name.startswith("_"))


@pytest.mark.parametrize("option", experiments())
def test_experiment_composes_with_its_entry_point(option, tmp_path):
    cfg = compose("train", [f"experiment={option}"], output_dir=tmp_path)
    OmegaConf.resolve(cfg)


@pytest.mark.parametrize("group,option", [("callbacks", "none"), ("callbacks", "default"), ("logger", "csv"),
                                          ("freeze", "none"), ("data", "alpaca"), ("model", "tiny")])
def test_quickstart_combines_with_other_options(group, option, tmp_path):
    """The default experiment must not leave half-configured entries when a group is swapped."""
    cfg = compose("train", [f"{group}={option}"], output_dir=tmp_path)
    for name, entry in (cfg.callbacks or {}).items():
        assert "_target_" in entry, f"callbacks.{name} lost its _target_"


def test_documented_no_logger_override_composes_to_no_loggers(tmp_path):
    """The README's config-groups row for `logger` names the override that turns logging off; it must work."""
    import re

    from safety_units.utils.config import instantiate_group

    [row] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `logger` |")]
    overrides = re.findall(r"`(~?logger(?:=[^`]*)?)`", row.split("|")[3])
    assert overrides, f"the README's logger row names no override: {row}"
    for override in overrides:
        for entry in ("train", "evaluate"):
            cfg = compose(entry, [override], output_dir=tmp_path)
            assert instantiate_group(cfg.get("logger"), "logger") == [], (override, entry)


def test_quickstart_is_the_default(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    assert cfg.model._target_.endswith("load_smollm2") and cfg.freeze.strategy == "ru_only"
    assert cfg.freeze.auto_attribute and "eval" in cfg.callbacks
    bare = compose("train", ["~experiment"], output_dir=tmp_path)
    assert bare.freeze.strategy == "none" and "eval" not in bare.callbacks


@pytest.mark.parametrize("group", ["scoring", "classify", "calibration", "units"])
def test_attribute_groups_compose(group, tmp_path):
    for option in options(group):
        cfg = compose("attribute", [f"{group}={option}"], output_dir=tmp_path)
        OmegaConf.resolve(cfg)


def test_data_paths_exist(tmp_path):
    for option in options("data"):
        cfg = compose("train", [f"data={option}"], output_dir=tmp_path)
        for name, src in cfg.data.sources.items():
            assert Path(src.path).is_file(), f"data={option}: {src.path}"


def test_trainer_strategies_instantiate_lazily(tmp_path):
    """DeepSpeed/FSDP configs build their strategy objects (no GPU needed to construct them)."""
    for option in ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        cfg = compose("train", [f"trainer={option}"], output_dir=tmp_path)
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ in ("DeepSpeedStrategy", "FSDPStrategy")
    ds3 = instantiate(compose("train", ["trainer=deepspeed_zero3"], output_dir=tmp_path).trainer.strategy)
    assert ds3.config["zero_optimization"]["stage"] == 3


def test_multi_node_settings_compose(tmp_path):
    cfg = compose("train", ["trainer=deepspeed_zero2", "trainer.num_nodes=4", "trainer.devices=8"], output_dir=tmp_path)
    assert cfg.trainer.num_nodes == 4 and cfg.trainer.devices == 8


def test_unknown_group_option_is_an_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("train", ["freeze=esu_only"], output_dir=tmp_path)


def test_every_eval_task_has_a_limit_key(tmp_path):
    for option in options("eval"):
        cfg = compose("evaluate", [f"eval={option}"], output_dir=tmp_path)
        for name, task in cfg.eval.tasks.items():
            assert task is None or "limit" in task, f"eval={option}: tasks.{name} has no limit key"
