"""Multi-node training rehearsed on one CPU host (docs/cluster.md): two torchrun "nodes" of two gloo processes each,
world size 4, running `train.py trainer=ddp trainer.num_nodes=2` exactly as SLURM's srun or torchrun on two machines
would. Frozen entries stay bit-identical and rank zero alone writes the run's files."""
import json
import os
import socket
import subprocess
import sys

from conftest import ROOT
from safetensors.torch import load_file
from testkit import EXACT, loaded_weights

from safety_units.models.loading import build_tiny
from safety_units.training.freezing import build_masker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_two_processes_keep_frozen_entries_exact_and_rank_zero_writes(unit_map, tmp_path):
    from conftest import train_cfg

    run, spy, port = tmp_path / "run", tmp_path / "spy", _free_port()
    overrides = ["~experiment", "model=tiny", "logger=csv", "callbacks=none", "data=alpaca", "data.num_samples=48",
                 "data.max_length=64", "data.batch_size=4", "data.val_fraction=0.1", "trainer.enable_progress_bar=false",
                 *EXACT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2",
                 "trainer.precision=32", "freeze=esu_cu", f"freeze.unit_map={unit_map}",
                 "+callbacks.spy._target_=spies.WriteSpy", f"+callbacks.spy.watch={run}", f"+callbacks.spy.out={spy}",
                 f"hydra.run.dir={run}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(ROOT / "train.py"), *overrides], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n\n".join(log[-3000:] for log in logs)
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in spy.glob("rank*.json"))}
    assert sorted(ranks) == [0, 1, 2, 3] and {r["world_size"] for r in ranks.values()} == {4}
    assert all(ranks[r]["written"] == [] for r in (1, 2, 3))
    assert {"model/config.json", "params.json", "summary.json", "model/freeze_check.json"} <= set(ranks[0]["written"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["freeze/frozen_max_abs_delta"] == 0.0
    cfg = train_cfg(run, *overrides[:-1])
    masker, _ = build_masker(cfg, build_tiny(cache_dir=cfg.paths.cache_dir).model)
    exported = load_file(run / "model" / "model.safetensors")
    assert masker.frozen_max_abs_delta(exported) == 0.0 and masker.trainable_changed(exported)
    assert any(not exported[n].equal(w) for n, w in loaded_weights().items() if n in exported)  # it trained
