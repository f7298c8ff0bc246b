"""Model fingerprints: which weights a unit map, a cached judge or a run was computed on (a few tensors hashed)."""

from __future__ import annotations

import hashlib
import json

import torch


def _tensor_digest(t: torch.Tensor) -> str:
    # Hash in bf16 so a map computed on an fp32 load matches the same weights loaded in bf16.
    data = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def weight_hash(model: torch.nn.Module, max_tensors: int = 4) -> str:
    """Hash of a few weight tensors spread over the model (first, middle, last)."""
    named = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and p.numel() > 0]
    if not named:
        return "none"
    picks = sorted({0, len(named) // 3, (2 * len(named)) // 3, len(named) - 1})[:max_tensors]
    h = hashlib.sha256()
    for i in picks:
        name, p = named[i]
        h.update(name.encode())
        h.update(_tensor_digest(p).encode())
    return h.hexdigest()[:20]


def model_fingerprint(model: torch.nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "num_layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "weight_hash": weight_hash(model),
    }


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
