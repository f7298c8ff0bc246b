"""Cost of attributing an MoE model's experts relative to a dense model of the same active size, in one run
(benchmarks/expert_attribution.py is the command line).

The pair is built offline from configs, random weights, same seed: a Mixtral with `experts` experts of `expert_units`
channels, `top_k` of them per token, and a Llama whose MLP has top_k * expert_units channels -- so each token meets
the same number of MLP channels and parameters in both (attention, embeddings and depth identical). Each is timed
on the same random token batches for: a plain forward (the model's own implementation: grouped GEMMs for the
experts), wifv (forward-only activation statistics; the experts through the tapped per-expert loop,
safety_units.units.experts) and snip (a backward per batch). Times are the best of `repeats`, after one warm-up pass.
The ratios MoE / dense, and each scorer's time over its model's forward, say what routing and the tap cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from safety_units.attribution.one_set import score_units
from safety_units.units.groups import resolve_units

METHODS = ("forward", "wifv", "snip")


def build_pair(layers: int, hidden: int, heads: int, experts: int, top_k: int, expert_units: int,
               vocab: int = 4096) -> dict:
    """{"moe": Mixtral, "dense": Llama with top_k * expert_units MLP channels}, both in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                  vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True)
    models = {}
    for name, make in (("moe", lambda: MixtralForCausalLM(MixtralConfig(
            **common, intermediate_size=expert_units, num_local_experts=experts, num_experts_per_tok=top_k))),
                       ("dense", lambda: LlamaForCausalLM(LlamaConfig(**common,
                                                                      intermediate_size=top_k * expert_units)))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models[name] = make().eval()
    return models


def active_mlp_params(model) -> int:
    """MLP parameters one token passes through: a dense MLP's all, an MoE layer's top-k experts' share."""
    total = 0
    for g in resolve_units(model):
        if g.kind == "mlp":
            total += sum(s.param.numel() for s in g.slices)
        elif g.kind == "expert":
            top_k = model.config.num_experts_per_tok
            total += sum(s.param.numel() for s in g.slices) * top_k // g.experts
    return total


def batches(vocab: int, n: int, batch: int, seq: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # a prompt half: snip's loss is on the response half
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(model, data: list[dict], method: str, repeats: int) -> float:
    if method == "forward":
        def run():
            with torch.no_grad():
                for b in data:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    else:
        groups = resolve_units(model)

        def run():
            score_units(model, groups, data, method, progress=False)
    return _seconds(run, repeats)


def compare(layers: int = 4, hidden: int = 256, heads: int = 4, experts: int = 8, top_k: int = 2,
            expert_units: int = 512, n_batches: int = 4, batch: int = 4, seq: int = 128, repeats: int = 2,
            methods=METHODS) -> dict:
    models = build_pair(layers, hidden, heads, experts, top_k, expert_units)
    data = batches(models["dense"].config.vocab_size, n_batches, batch, seq)
    rows = {name: {m: measure(model, data, m, repeats) for m in methods} for name, model in models.items()}
    settings = dict(layers=layers, hidden=hidden, heads=heads, experts=experts, top_k=top_k,
                    expert_units=expert_units, n_batches=n_batches, batch=batch, seq=seq, repeats=repeats,
                    threads=torch.get_num_threads(),
                    active_mlp_params={n: active_mlp_params(m) for n, m in models.items()},
                    units={n: sum(g.n for g in resolve_units(m) if g.kind in ("mlp", "expert"))
                           for n, m in models.items()})
    return {"settings": settings, "seconds": rows}


def table(result: dict) -> str:
    rows, forward = result["seconds"], {n: r.get("forward") for n, r in result["seconds"].items()}
    lines = ["| method | dense s | MoE s | MoE / dense | dense / its forward | MoE / its forward |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in rows["dense"]:
        d, e = rows["dense"][m], rows["moe"][m]
        over = (f"{d / forward['dense']:.2f}x | {e / forward['moe']:.2f}x" if forward["dense"] else "- | -")
        lines.append(f"| {m} | {d:.3f} | {e:.3f} | {e / d:.2f}x | {over} |")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
