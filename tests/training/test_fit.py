"""What `python train.py` runs (safety_units.training.fit): end to end, resume, Ctrl-C, loggers, sweeps, quickstart."""
import csv
import json

import pytest
import torch
from conftest import compose, train_cfg
from transformers import AutoModelForCausalLM

from safety_units.utils.errors import ConfigError
from safety_units.training.fit import run_train


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_tiny_train_end_to_end_exports_hf_model(tmp_path):
    summary = run_train(train_cfg(tmp_path, "trainer.max_steps=5"))
    assert summary["global_step"] == 5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert "data:" in (tmp_path / "model" / "safety_units_config.yaml").read_text()
    assert len(_losses(tmp_path)) == 5


def test_resume_equals_uninterrupted_run(tmp_path):
    common = ["trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "optim.weight_decay=0.1",
              "optim.lr=1e-3", "callbacks=default", "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    full = tmp_path / "full"
    run_train(train_cfg(full, *common))
    ckpt = full / "checkpoints" / "step000003.ckpt"
    assert ckpt.is_file()
    resumed = tmp_path / "resumed"
    run_train(train_cfg(resumed, *common, f"ckpt_path={ckpt}"))
    a, b = _losses(full), _losses(resumed)
    assert set(b) == {3, 4, 5} and all(a[s] == b[s] for s in b)
    wa = AutoModelForCausalLM.from_pretrained(full / "model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_unknown_config_key_is_an_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="batchsize"):
        train_cfg(tmp_path, "data.batchsize=3")


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, monkeypatch):
    import signal

    import lightning.pytorch as pl

    import safety_units.training.fit as training

    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    real = training.build_trainer
    monkeypatch.setattr(training, "build_trainer", lambda cfg, extra, run_dir: real(cfg, extra + [Interrupt()], run_dir))
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run_train(train_cfg(tmp_path / "a", "trainer.max_steps=6"))
    finally:
        signal.signal(signal.SIGINT, handler)
    ckpt = tmp_path / "a" / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file()
    monkeypatch.setattr(training, "build_trainer", real)
    summary = run_train(train_cfg(tmp_path / "b", "trainer.max_steps=6", f"ckpt_path={ckpt}"))
    assert summary["global_step"] == 6


def test_wandb_logger_runs_offline_and_is_finished_after_a_failing_fit(tmp_path):
    """A multirun job that fails mid-fit must not leave its wandb run open for the next job."""
    import wandb

    cfg = train_cfg(tmp_path, "logger=wandb", "trainer.max_steps=3", "+callbacks.fail._target_=spies.FailAtStep",
                    "+callbacks.fail.step=1")
    with pytest.raises(RuntimeError, match="failing on purpose"):
        run_train(cfg)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # the run had started, offline
    assert wandb.run is None


def test_a_missing_optimized_metric_is_a_clear_error():
    """hparams_search=optuna sets optimized_metric; a run that did not log it must not hand the sweeper None."""
    from omegaconf import OmegaConf

    from safety_units.training.fit import optimized_metric

    assert compose("train", []).optimized_metric is None  # a plain run optimises nothing
    assert compose("train", ["hparams_search=optuna"]).optimized_metric == "val/loss"
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    assert optimized_metric(cfg, {"val/loss": 1.5, "train/loss": 2.0}) == 1.5
    assert optimized_metric(OmegaConf.create({"optimized_metric": None}), {}) is None
    with pytest.raises(ConfigError, match=r"optimized_metric='val/loss' was not logged .*data.val_fraction > 0.*"
                                          r"logged: train/loss, train/lr"):
        optimized_metric(cfg, {"train/loss": 2.0, "train/lr": 1e-5})


def test_multirun_jobs_are_a_dashboard_online_and_offline(tmp_path, unit_map):
    """Two jobs (seed=1,2) with logger=wandb offline, read back with wandb's own reader: each run holds the resolved
    config as dotted keys, a summary with the eval change and the frozen check, a completions table and the unit
    map's plot; `python -m safety_units.runs` tabulates the jobs with exactly the swept key as its varied column."""
    import subprocess
    import sys

    from conftest import ROOT
    from spies import read_wandb_run

    from safety_units.runs import runs_table

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "~experiment", "model=tiny", "logger=wandb", "callbacks=eval",
           "callbacks.eval.suite.limit=3", "callbacks.eval.suite.max_new_tokens=4", "~callbacks.model_checkpoint",
           "freeze=esu_cu", f"freeze.unit_map={unit_map}", "data=alpaca", "data.num_samples=16",
           "data.max_length=48", "trainer.max_steps=1", "trainer.enable_progress_bar=false", "seed=1,2",
           f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and (p / "model" / "config.json").is_file()) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        (run,) = (tmp_path / job / "wandb").glob("offline-run-*")
        got = read_wandb_run(run)
        assert got["config"]["freeze.strategy"] == "esu_cu" and got["config"]["seed"] == seed
        assert got["config"]["optim.lr"] == compose("train", ["~experiment"]).optim.lr
        assert "git.commit" in got["config"] and "unit_map.fingerprint" in got["config"]
        assert got["config"]["freeze.frozen_share"] > 0
        s = got["summary"]
        assert s["freeze/frozen_max_abs_delta"] == 0.0 and "eval/harmful/asr/change" in s
        assert "eval/harmful/asr/p" in s and s["train/tokens_per_s"] > 0 and s["time/wall_s"] > 0
        assert got["history"]["completions/harmful._type"] == "table-file"
        assert got["history"]["plots/units_per_layer._type"] in ("image-file", "images/separated")
        params = json.loads((tmp_path / job / "params.json").read_text())
        assert params["seed"] == seed and params["freeze.strategy"] == "esu_cu"
    table = runs_table(tmp_path)
    assert table["varied"] == ["seed"] and table["jobs"] == ["0", "1"]
    assert "eval/harmful/asr/change" in table["metrics"] and "freeze/frozen_max_abs_delta" in table["metrics"]
    out = subprocess.run([sys.executable, "-m", "safety_units.runs", str(tmp_path), "--csv", str(tmp_path / "r.csv")],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    header = next(line for line in out.splitlines() if line.startswith("| job |"))
    assert header.split(" | ")[1] == "seed" and "2 runs; swept: seed" in out
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("job,seed,")


def test_optuna_sweep_runs_trials(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "~experiment", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.sampler.n_startup_trials=1", "model=tiny", "logger=csv", "callbacks=none",
           "data.num_samples=16", "data.max_length=48", "data.val_fraction=0.25", "trainer.max_steps=1",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "optimization_results.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "model").is_dir()) == ["0", "1"]


def test_quickstart_path_on_tiny(tmp_path):
    """`python train.py` with model=tiny: auto-attribution, RU-only training, eval before and after."""
    cfg = compose("train", ["model=tiny", "logger=csv", "data.num_samples=32", "data.max_length=64",
                            "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                            "callbacks.eval.suite.limit=4", "callbacks.eval.suite.max_new_tokens=8",
                            f"paths.cache_dir={tmp_path / 'cache'}"], output_dir=tmp_path / "run")
    summary = run_train(cfg)
    assert summary["freeze"]["strategy"] == "ru_only"
    assert summary["freeze"]["unit_map"].startswith(str(tmp_path / "cache" / "unit_maps"))
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"]
    assert "| harmful | asr |" in (tmp_path / "run" / "eval_compare.md").read_text()
    assert (tmp_path / "run" / "model" / "unit_map.safetensors").is_file()


@pytest.mark.parametrize("launcher", ["local", "gpus"])
def test_a_sweep_runs_on_the_cluster_launchers_and_lands_where_the_basic_one_puts_it(tmp_path, launcher):
    """hydra/launcher=local (submitit's local executor: a SLURM sweep's rehearsal) and hydra/launcher=gpus (joblib,
    one process per job): both jobs train in their own <sweep dir>/<job num>/, and `python -m safety_units.runs`
    tabulates them by the swept key."""
    import subprocess
    import sys

    from conftest import ROOT

    from safety_units.runs import runs_table

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra/launcher={launcher}", *TINY_SWEEP, "seed=1,2",
           f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "model" / "config.json").is_file()) == ["0", "1"]
    assert [json.loads((tmp_path / j / "params.json").read_text())["seed"] for j in ("0", "1")] == [1, 2]
    if launcher == "local":  # submitit's own record of each job: the sbatch-like logs a user reads on failure
        assert len(list((tmp_path / ".submitit").glob("*/*_log.out"))) == 2
    table = runs_table(tmp_path)
    assert table["varied"] == ["seed"] and table["jobs"] == ["0", "1"]


TINY_SWEEP = ["~experiment", "model=tiny", "logger=csv", "callbacks=none", "data.num_samples=16", "data.max_length=48",
              "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
