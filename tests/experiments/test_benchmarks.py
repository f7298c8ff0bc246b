"""The benchmarks' measuring parts (safety_units.experiments.benchmarks), on the tiny model or the shipped
artifacts: a fresh worker process, naive SNIP against ours, masked steps that keep frozen entries, the wandb timing
patch, steering's token rate, the time projection's fit of the measured H100 stages, and the MoE / dense pair of the
expert attribution benchmark."""
import os

import pytest
import torch
from conftest import ROOT

from safety_units.experiments.benchmarks import (attribution_cost, expert_cost, logging_overhead, mask_overhead,
                                                 scorer_cost, steering_cost, time_projection)
from safety_units.experiments.benchmarks.peak_memory import WorkerFailed, allocation_probe, in_fresh_process


def test_a_worker_process_has_its_own_environment_and_fails_clearly():
    assert in_fresh_process(os.getenv, key="MALLOC_MMAP_THRESHOLD_") == "131072"  # glibc returns freed blocks
    assert in_fresh_process(os.getenv, env={"SU_BENCH_TEST": "7"}, key="SU_BENCH_TEST") == "7"
    with pytest.raises(WorkerFailed, match="getenv"):
        in_fresh_process(os.getenv, no_such_argument=1)
    probe = in_fresh_process(allocation_probe, mb=64)  # the meter sees 64 MB held for 0.2 s
    assert probe["seconds"] >= 0.2 and 32 < probe["peak_mb"] < 200


def test_naive_per_weight_snip_equals_the_per_unit_snip(tiny):
    from safety_units.attribution.one_set import score_units
    from safety_units.units.groups import resolve_units

    torch.manual_seed(0)
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt part, as calibration batches have
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}] * 2
    groups = resolve_units(tiny.model)
    naive = attribution_cost.naive_snip(tiny.model, groups, batches)
    ours = score_units(tiny.model, groups, batches, "snip", progress=False)
    assert set(naive) == set(ours) and all(torch.allclose(naive[k], ours[k], rtol=1e-4, atol=1e-8) for k in naive)
    rows = {m: {"samples_per_s": s, "peak_extra_mb": 10.0 * s, "samples": 8} for m, s in (("snip", 2.0),
                                                                                          ("naive_snip", 1.0))}
    assert "| snip | 2.00 | 2.00x | 20 | 2.000 |" in attribution_cost.table(rows, 4, 128, "tiny")


def test_masked_lora_steps_keep_frozen_entries_exactly():
    out = mask_overhead.measure("tiny", "cpu", 2, 16, 1, "hook", ["lora"])  # the adapter's B rows / A columns
    assert set(out) == {"lora"} and out["lora"]["frozen_max_abs_delta"] == 0.0 and out["lora"]["ratio"] > 0
    assert "[lora] masked/unmasked step-time ratio:" in mask_overhead.report(out, 1)


def test_the_wandb_timing_counts_the_trainers_calls_only_and_restores_wandb(monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from safety_units.utils.run_logging import Stopwatch

    monkeypatch.setattr(WandbLogger, "log_metrics", lambda self, metrics, step=None: None)
    monkeypatch.setattr(wandb, "init", lambda *a, **kw: "run")
    plain = WandbLogger.log_metrics
    with logging_overhead.timed_wandb() as timing:
        assert wandb.init() == "run"
        WandbLogger.log_metrics(None, {"loss": 1.0})
        with Stopwatch():  # run_logging's own call: counted there, not here
            WandbLogger.log_metrics(None, {"loss": 1.0})
    assert timing["log_metrics_calls"] == 1 and timing["init_s"] >= 0
    assert WandbLogger.log_metrics is plain


def test_steering_cost_rates_generation_per_method(tiny):
    from safety_units.steering.prompt_states import chat_ids
    from safety_units.utils.config import compose_config

    cfgs = {"none": compose_config("evaluate", ["steer=none"]).steer}
    rows = chat_ids(tiny.tokenizer, ["Hello", "How are you today?", "Name a colour."])
    best = steering_cost.tokens_per_second(tiny.model, tiny.tokenizer, cfgs, rows, 3, 2, 1)
    assert best["none"] > 0
    assert "1.000x steer=none" in steering_cost.report(best, "tiny")


def test_the_scorer_benchmark_covers_the_harness_scorers_and_heads():
    from safety_units.attribution.pipeline import SCORER_RUNS

    assert set(SCORER_RUNS) < set(scorer_cost.SCORERS)
    assert scorer_cost.SCORERS["mask_heads"] == [*SCORER_RUNS["mask"], "units.heads=true"]
    rows = {n: {"samples_per_s": s, "peak_extra_mb": 100.0, "seconds": 1.0} for n, s in (("wifv", 4.0), ("atp", 1.0))}
    assert "| atp | 1.00 | 0.25x | 100 | 1.00x | 1.0 |" in scorer_cost.table(rows)


def test_the_time_projection_fits_the_measured_h100_stages(tmp_path):
    log = tmp_path / "device.log"
    log.write_text("[run ] c_a_s0 x\rharmful: 100%|####| 2/2 [00:02<00:00,  1.50s/it]\ndone in 9.5 s\n")
    assert time_projection.read_log(log) == {"c_a_s0": {"passes": {"harmful": (2, 1.5)}, "seconds": 9.5}}
    study = ROOT / "results" / "ssah_smollm2"
    c = time_projection.measured_costs(time_projection.Measured(study / "runs", study / "device_timing_c_stages.log"))
    # the numbers docs/benchmarks.md reports: a decoding pass, an optimizer step, a training stage's fixed part
    assert (round(c["t_pass"], 2), round(c["t_step"], 3), round(c["fixed_train"], 2)) == (1.16, 0.215, 1.92)
    assert c["task_sizes"] == {"harmful": 250, "oktest": 100}


def test_the_expert_benchmark_compares_an_moe_model_with_a_dense_one_of_the_same_active_size():
    result = expert_cost.compare(layers=1, hidden=32, heads=2, experts=4, top_k=2, expert_units=16, n_batches=1,
                                 batch=2, seq=8, repeats=1, methods=("forward", "wifv"))
    s = result["settings"]
    assert s["active_mlp_params"]["moe"] == s["active_mlp_params"]["dense"] == 3 * 32 * 32
    assert s["units"] == {"moe": 4 * 16, "dense": 32}  # every expert's channels are units
    assert set(result["seconds"]) == {"moe", "dense"} and all(
        t > 0 for r in result["seconds"].values() for t in r.values())
    lines = expert_cost.table(result).splitlines()
    assert lines[0].startswith("| method | dense s | MoE s | MoE / dense") and len(lines) == 4
