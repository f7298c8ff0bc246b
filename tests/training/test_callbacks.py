"""The callbacks of a training run (safety_units.training.callbacks), each called as Lightning calls it, on the tiny
model with a stand-in trainer (what a callback reads of it: strategy, rank, loggers, step): the Ctrl-C checkpoint,
the frozen-entry check and export, the evaluation's refusal under sharded weights, and the run's summary; and one
whole run's before/after evaluation table."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, train_cfg
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from transformers import AutoModelForCausalLM

from safety_units.evaluation.judges.refusal import PatternJudge
from safety_units.training.callbacks import EvalCallback, FinalizeRun, InterruptCheckpoint, RunSummary
from safety_units.training.freezing import build_masker
from safety_units.units.unit_map import load_selection


def trainer(tmp_path, rank: int = 0, strategy=None, **kw):
    return SimpleNamespace(strategy=strategy or SingleDeviceStrategy("cpu"), is_global_zero=rank == 0,
                           loggers=[CSVLogger(tmp_path, name="csv")], global_step=3, callbacks=[], ckpt_path=None,
                           **kw)


def csv_metrics(logger: CSVLogger) -> list[str]:
    """The metric names a CSV logger has written."""
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return f.readline().strip().split(",")


@pytest.mark.parametrize("exception,saved", [(KeyboardInterrupt(), True), (RuntimeError("bad batch"), False)])
def test_ctrl_c_saves_a_resumable_checkpoint_and_other_errors_do_not(tmp_path, caplog, exception, saved):
    saves = []
    t = trainer(tmp_path, save_checkpoint=saves.append)
    InterruptCheckpoint(str(tmp_path / "checkpoints")).on_exception(t, None, exception)
    assert saves == ([tmp_path / "checkpoints" / "interrupted.ckpt"] if saved else [])
    assert ("resume with ckpt_path=" in caplog.text) is saved


@pytest.fixture
def planted(tiny, tmp_path):
    """The tiny model with freeze=train_only on a random 10% of its units (a real masker, snapshot taken), and one
    trainable entry of each partly trained weight moved as a training step would."""
    masker, _ = build_masker(train_cfg(tmp_path, "freeze=train_only", "freeze.random_share=0.1"), tiny.model)
    params = dict(tiny.model.named_parameters())
    with torch.no_grad():
        for name, m in masker.partial.items():
            params[name].index_fill_(m.dim, m.trainable_index()[:1], 0.5)
    return tiny, masker, params


def test_finalize_checks_the_frozen_entries_and_exports_the_model(planted, tmp_path):
    tiny, masker, _ = planted
    fin = FinalizeRun(str(tmp_path), tiny.tokenizer, "seed: 0\n", masker=masker)
    fin.on_train_end(trainer(tmp_path), SimpleNamespace(model=tiny.model))
    assert fin.summary == {"frozen_max_abs_delta": 0.0, "trainable_changed": True}
    out = tmp_path / "model"
    assert json.loads((out / "freeze_check.json").read_text()) == fin.summary
    assert (out / "safety_units_config.yaml").read_text() == "seed: 0\n"
    sel, meta = load_selection(out / "trained_units.safetensors")  # the exact unit set that trained
    assert meta["role"] == "trained" and sel.keys() == masker.selection.keys()
    assert all(torch.equal(sel[k], masker.selection[k].bool()) for k in sel)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), tiny.model.state_dict().values()))
    assert (out / "tokenizer_config.json").is_file()


def test_a_moved_frozen_entry_is_reported_and_logged(planted, tmp_path):
    tiny, masker, params = planted
    name = next(iter(masker.snapshot))  # a wholly frozen weight (train_only freezes embeddings, norms, ...)
    with torch.no_grad():
        params[name].view(-1)[0] += 0.25
    t = trainer(tmp_path)
    fin = FinalizeRun(str(tmp_path), tiny.tokenizer, "", masker=masker, export=False)
    fin.on_train_end(t, SimpleNamespace(model=tiny.model))
    assert fin.summary["frozen_max_abs_delta"] == pytest.approx(0.25, rel=1e-3)
    assert "freeze/frozen_max_abs_delta" in csv_metrics(t.loggers[0])
    assert not (tmp_path / "model").exists()  # export=false


def test_other_ranks_neither_check_nor_export(planted, tmp_path):
    tiny, masker, _ = planted
    fin = FinalizeRun(str(tmp_path), tiny.tokenizer, "", masker=masker)
    fin.on_train_end(trainer(tmp_path, rank=1), SimpleNamespace(model=tiny.model))
    assert fin.summary == {} and not (tmp_path / "model").exists()


class FSDPStrategy:
    """Sharded weights, as weights_sharded reads them (by name); counts the ranks' meeting points."""

    def __init__(self):
        self.barriers = 0

    def barrier(self):
        self.barriers += 1


def test_the_evaluation_refuses_sharded_weights_and_skips_a_resumed_before(tmp_path, caplog):
    cb = EvalCallback(suite={}, judge=None, output_dir=tmp_path / "run")
    t = trainer(tmp_path, strategy=FSDPStrategy())
    cb.on_fit_start(t, SimpleNamespace())
    cb.on_train_end(t, SimpleNamespace())
    assert cb.results == {} and not (tmp_path / "run").exists()
    assert caplog.text.count("weights are sharded under FSDPStrategy") == 2
    assert "model.path=<run dir>/model" in caplog.text
    assert t.strategy.barriers == 0  # every rank returns before the barrier: none waits for the others
    caplog.clear()
    t.ckpt_path = "last.ckpt"  # a resumed run was evaluated before its interruption
    cb.on_fit_start(t, SimpleNamespace())
    assert "sharded" not in caplog.text


class TwoRanks(SingleDeviceStrategy):
    """reduce(sum) as if a second rank had counted the same tokens."""

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert reduce_op == "sum"
        return 2 * tensor


def test_the_run_summary_collects_params_time_tokens_freeze_and_eval_change(tmp_path):
    t = trainer(tmp_path, strategy=TwoRanks("cpu"))
    params = {"optim.lr": 1e-3, "freeze.strategy": "esu"}
    finalize = SimpleNamespace(summary={"frozen_max_abs_delta": 0.0, "trainable_changed": True})
    rs = RunSummary(str(tmp_path / "run"), params, images={"plots/units": tmp_path / "none.png"}, finalize=finalize)
    module = SimpleNamespace(device=torch.device("cpu"))
    rs.on_fit_start(t, module)
    assert json.loads((tmp_path / "run" / "params.json").read_text()) == params
    rs.on_train_start(t, module)
    for n in (5, 7):
        rs.on_train_batch_end(t, module, None, {"attention_mask": torch.ones(1, n)}, 0)
    ev = EvalCallback(suite={}, judge=None, output_dir=tmp_path / "run")
    ev.results = {w: {"harmful": {"task": "harmful", "metric": "asr", "value": v,
                                  "extra": {"prompt_hash": "h", "outcomes": [1] * round(4 * v) + [0] * round(4 - 4 * v)}}}
                  for w, v in (("before", 0.75), ("after", 0.25))}
    t.callbacks = [ev, rs]
    rs.on_train_end(t, module)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train/tokens"] == 24 and summary["train/global_step"] == 3  # both ranks' 12 tokens
    assert summary["time/wall_s"] >= summary["time/train_s"] >= 0
    assert summary["freeze/frozen_max_abs_delta"] == 0.0 and summary["freeze/trainable_changed"] is True
    assert summary["eval/harmful/asr/before"] == 0.75 and summary["eval/harmful/asr/change"] == -0.5
    assert "eval/harmful/asr/p" in summary and "train/tokens" in csv_metrics(t.loggers[0])
    rank1 = trainer(tmp_path / "r1", rank=1, strategy=TwoRanks("cpu"))
    RunSummary(str(tmp_path / "r1" / "run"), params).on_train_end(rank1, module)  # takes part in the sum, writes nothing
    assert not (tmp_path / "r1" / "run").exists()


def test_eval_callback_writes_before_after_table(tmp_path):
    from safety_units.training.fit import run_train

    cfg = train_cfg(tmp_path, "callbacks=eval", "callbacks.eval.suite.limit=3", "callbacks.eval.suite.max_new_tokens=6",
                    "trainer.max_steps=2")
    summary = run_train(cfg)
    table = (tmp_path / "eval_compare.md").read_text()
    assert "| harmful | asr |" in table and "| ppl | ppl |" in table
    default_judge = compose("evaluate", []).judge._target_.rsplit(".", 1)[1]
    assert cfg.callbacks.eval.judge._target_.endswith(default_judge)  # the callback uses the default judge
    assert f"Refusal judge: {getattr(PatternJudge, 'name')}." in table and "| 95% CI of change | McNemar p |" in table
    before = json.loads((tmp_path / "eval_before.json").read_text())
    after = json.loads((tmp_path / "eval_after.json").read_text())
    assert all(before[k]["extra"]["prompt_hash"] == after[k]["extra"]["prompt_hash"] for k in before)
    # the run trains on Alpaca: the ppl slice is held out by hash, so nothing of it was trained on
    assert before["ppl"]["extra"]["train_overlap"] == 0
    assert set(summary["eval"]) == {"before", "after"}
    assert (tmp_path / "eval_before.json").is_file() and (tmp_path / "eval_after.json").is_file()
