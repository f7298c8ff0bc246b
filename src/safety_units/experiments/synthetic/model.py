"""`model=synthetic`: a small Llama built from config and pretrained from scratch on the world's data (every task x
concept, answered), cached under `<cache_dir>/synthetic/<config hash>/` and resumable: a checkpoint (weights,
optimizer, step) every `checkpoint_every` steps; an interrupted pretraining continues from it.

Pretraining is a plain PyTorch loop (the loss on the answer tokens, AdamW, warmup then cosine): a few thousand
steps of a ~1M-parameter model, no Lightning needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from safety_units.data.chat import collate, encode_example
from safety_units.utils.errors import ConfigError
from safety_units.models.loading import LoadedModel
from safety_units.utils.ranks import RankedLogger
from safety_units.experiments.synthetic.world import World, build_tokenizer

log = RankedLogger(__name__)


def config_hash(world: dict, arch: dict, pretrain: dict) -> str:
    return hashlib.sha256(json.dumps([world, arch, pretrain], sort_keys=True).encode()).hexdigest()[:12]


def build_model(tokenizer, arch: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=int(arch["hidden_size"]),
                         intermediate_size=int(arch["intermediate_size"]), num_hidden_layers=int(arch["num_layers"]),
                         num_attention_heads=int(arch["num_heads"]), num_key_value_heads=int(arch["num_kv_heads"]),
                         max_position_embeddings=int(arch.get("max_position_embeddings", 64)),
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encoded_rows(tokenizer, rows: list[dict], max_length: int):
    return [encode_example(tokenizer, [{"role": "user", "content": r["prompt"]},
                                       {"role": "assistant", "content": r["response"]}], max_length) for r in rows]


def pretrain(model, tokenizer, world: World, p: dict, out: Path, progress: bool = True) -> dict:
    """Train `model` on world.pretraining(p['examples']) for p['steps'] steps; resumable from out/ckpt.pt."""
    from tqdm.auto import tqdm

    steps, bs = int(p["steps"]), int(p["batch_size"])
    data = encoded_rows(tokenizer, world.pretraining(int(p["examples"]), int(p.get("seed", 0))),
                        int(p.get("max_length", 48)))
    opt = torch.optim.AdamW(model.parameters(), lr=float(p["lr"]), weight_decay=float(p.get("weight_decay", 0.01)))
    warmup = int(p.get("warmup", 100))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    ckpt, start, seconds, losses = out / "ckpt.pt", 0, 0.0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, seconds, losses = state["step"], state["seconds"], state["losses"]
        log.info("synthetic pretraining: resuming at step %d of %d from %s", start, steps, ckpt)
    g = torch.Generator().manual_seed(int(p.get("seed", 0)))
    order = torch.randperm(len(data), generator=g).tolist()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="synthetic pretraining", disable=not progress, initial=start, total=steps)
    for step in bar:
        idx = [order[(step * bs + i) % len(order)] for i in range(bs)]
        batch = collate([data[i] for i in idx], tokenizer.pad_token_id, 1)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise ConfigError(f"synthetic pretraining diverged at step {step} (loss {loss.item()}); lower "
                              f"model.pretraining.lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % int(p.get("checkpoint_every", 200)) == 0 and step + 1 < steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "step": step + 1, "seconds": seconds + time.perf_counter() - t0, "losses": losses}
            torch.save(state, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
    model.eval()
    return {"steps": steps, "seconds": round(seconds + time.perf_counter() - t0, 1), "final_loss": losses[-1],
            "losses": losses[::max(1, len(losses) // 100)]}


@torch.no_grad()
def task_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of rows whose answer the model gets exactly right (greedy, teacher-forced argmax on every answer
    token), the capability check after pretraining. A row with a `prefill` (the prefix jailbreak) is scored on the
    tokens after it: the prefilled first token is given, not predicted."""
    full = [dict(r, response=f"{r['prefill']} {r['response']}".strip()) if r.get("prefill") else r for r in rows]
    data = encoded_rows(tokenizer, full, 64)
    for e, r in zip(data, full):
        if r.get("prefill"):
            e.labels[next(i for i, t in enumerate(e.labels) if t != -100)] = -100
    right = 0
    model.eval()
    for b in range(0, len(data), batch_size):
        batch = collate(data[b:b + batch_size], tokenizer.pad_token_id, 1)
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        labels = batch["labels"][:, 1:]
        ok = (pred[:, :-1] == labels) | (labels == -100)
        right += int(ok.all(dim=1).sum())
    return right / len(data)


def load_synthetic(cache_dir: str, world: dict, arch: dict, pretraining: dict, progress: bool = True,
                   dtype: str = "float32") -> LoadedModel:
    """The pretrained synthetic model of this config (pretrained now if it is not cached)."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    world = OmegaConf.to_container(world, resolve=True) if OmegaConf.is_config(world) else dict(world)
    arch = OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else dict(arch)
    p = OmegaConf.to_container(pretraining, resolve=True) if OmegaConf.is_config(pretraining) else dict(pretraining)
    w = World(**world)
    tok = build_tokenizer(w)
    key = config_hash(world, arch, p)
    out = Path(cache_dir) / "synthetic" / key
    final = out / "model"
    if (final / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(final, dtype=getattr(torch, dtype))
        return LoadedModel(model.eval(), tok, name=f"synthetic-{key}")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(tok, arch, int(p.get("seed", 0)))
    log.info("synthetic model %s: %.2fM parameters, pretraining %d steps (cached in %s)", key,
             sum(q.numel() for q in model.parameters()) / 1e6, int(p["steps"]), out)
    report = pretrain(model, tok, w, p, out, progress)
    report["task_accuracy"] = {g: task_accuracy(model, tok, [r for r in w.evaluation(100) if r["group"] == g
                                                             and not r["prefill"]])
                               for g in ("safe", "unsafe", "jailbreak_synonym", "jailbreak_composed")}
    tmp = out / "model.tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps(report | {"world": world, "arch": arch, "pretrain": p}, indent=1))
    os.replace(tmp, final)
    (out / "ckpt.pt").unlink(missing_ok=True)
    log.info("synthetic pretraining: %d steps in %.0f s, loss %.3f, task accuracy %s", report["steps"],
             report["seconds"], report["final_loss"], report["task_accuracy"])
    return LoadedModel(model.eval(), tok, name=f"synthetic-{key}")
