"""Callbacks that only tests use (composed in with `+callbacks.<name>._target_=spies.<Class>`).

WriteSpy records, in each training process, the files that process opens for writing under a run dir (Python's
`open` audit event, so tokenizer, config and json writes are all seen) and saves the list per rank at teardown: the
multi-process tests check that exactly one rank writes the run's files. FailAtStep makes a job fail mid-fit."""
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WriteSpy(pl.Callback):
    def __init__(self, watch: str, out: str):
        self.watch, self.out = str(Path(watch).resolve()), out
        self.written: list[str] = []

    def setup(self, trainer, pl_module, stage):
        def hook(event, args):
            if event != "open" or not isinstance(args[0], (str, os.PathLike)):
                return
            path, mode, flags = str(args[0]), args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if writes and os.path.abspath(path).startswith(self.watch):
                self.written.append(os.path.relpath(os.path.abspath(path), self.watch))

        sys.addaudithook(hook)  # this process only: a spawned worker ends with its rank's work

    def teardown(self, trainer, pl_module, stage):
        Path(self.out).mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "written": sorted(set(self.written))}
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FailAtStep(pl.Callback):
    """Raises after optimizer step `step`: a job that fails mid-fit, once its loggers have started."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"FailAtStep: failing on purpose at step {trainer.global_step}")


def read_wandb_run(run_dir) -> dict:
    """An offline wandb run read back with wandb's own reader (`wandb leet inspect --json`): its config, final
    summary, and the keys of every history item (e.g. `completions/harmful._type` = table-file)."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True)
    config, summary, history = {}, {}, {}
    for line in res.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            config.update(rec["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            config.update(rec["config"].get("update", {}))
        elif kind == "summary":
            summary.update(rec["summary"].get("update", {}))
        elif kind == "history":
            history.update(rec["history"].get("item", {}))
    return {"config": config, "summary": summary, "history": history}
