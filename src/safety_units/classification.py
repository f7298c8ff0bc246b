"""Sort units into ESU / EUU / CU / RU from their safety and utility scores.

Scores are first turned into percentile ranks in [0, 1] -- within each layer (default) or over all layers --
so that layers with larger activations do not dominate. Then, separately for MLP and attention units:

1. ESU: the `esu` share of units with the largest rank difference safety - utility, among units whose safety
   rank is at least `min_safety_rank`;
2. EUU: of the rest, the `euu` share with the largest utility - safety, among units with utility rank at least
   `min_utility_rank`;
3. RU: of the rest, the `ru` share with the smallest safety + utility;
4. CU: everything else.

Every tie is broken by a fixed secondary key and finally by unit position, so the result is deterministic and
every unit gets exactly one class.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from safety_units.errors import ConfigError

log = logging.getLogger(__name__)

CLASS_CODES = {"cu": 0, "esu": 1, "euu": 2, "ru": 3}
CLASS_NAMES = {v: k for k, v in CLASS_CODES.items()}
DEFAULT_SHARES = {"esu": 0.013, "euu": 0.13, "ru": 0.15}  # close to the paper's Llama-2-7B-chat figures


def percentile_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks scaled to [0, 1] (ties share a rank); a single unit gets 0.5."""
    v = x.detach().double().cpu().numpy()
    n = v.size
    if n == 1:
        return torch.tensor([0.5], dtype=torch.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    # average the ranks of exact ties
    sv = v[order]
    start = 0
    for i in range(1, n + 1):
        if i == n or sv[i] != sv[start]:
            if i - start > 1:
                ranks[order[start:i]] = (start + i - 1) / 2.0
            start = i
    return torch.from_numpy(ranks / (n - 1))


def normalise(scores: dict[str, torch.Tensor], mode: str = "per_layer") -> dict[str, torch.Tensor]:
    """Percentile ranks per key ('mlp.3') for per_layer, or over all keys of a kind for global."""
    if mode == "per_layer":
        return {k: percentile_ranks(v) for k, v in scores.items()}
    if mode == "global":
        out = {}
        for kind in sorted({k.split(".")[0] for k in scores}):
            keys = [k for k in scores if k.split(".")[0] == kind]
            flat = percentile_ranks(torch.cat([scores[k].double().flatten() for k in keys]))
            for k, part in zip(keys, torch.split(flat, [scores[k].numel() for k in keys])):
                out[k] = part
        return out
    raise ConfigError(f"classify.normalization must be 'per_layer' or 'global', got {mode!r}.")


def _validate_shares(shares: dict) -> dict:
    s = {k: float(shares.get(k, DEFAULT_SHARES[k])) for k in ("esu", "euu", "ru")}
    for k, v in s.items():
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"classify.shares.{k} must be in [0, 1), got {v}.")
    if sum(s.values()) >= 1.0:
        raise ConfigError(f"classify.shares must sum to less than 1 (the rest are CU), got {s}.")
    return s


def classify(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor], shares: dict | None = None,
             normalization: str = "per_layer", min_safety_rank: float = 0.5,
             min_utility_rank: float = 0.5) -> dict[str, torch.Tensor]:
    """uint8 class codes (CLASS_CODES) per key, same shapes as the score vectors."""
    shares = _validate_shares(shares or {})
    if set(safety) != set(utility):
        raise ConfigError("safety and utility scores cover different units.")
    rs, ru = normalise(safety, normalization), normalise(utility, normalization)
    out: dict[str, torch.Tensor] = {}
    for kind in sorted({k.split(".")[0] for k in safety}):
        keys = sorted((k for k in safety if k.split(".")[0] == kind), key=lambda k: int(k.split(".")[1]))
        s = torch.cat([rs[k] for k in keys]).numpy()
        u = torch.cat([ru[k] for k in keys]).numpy()
        n = s.size
        pos = np.arange(n)
        cls = np.full(n, CLASS_CODES["cu"], dtype=np.uint8)
        free = np.ones(n, dtype=bool)

        def take(count: int, eligible: np.ndarray, primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
            # Largest primary first, then largest secondary, then lowest position.
            idx = np.flatnonzero(eligible & free)
            order = np.lexsort((pos[idx], -secondary[idx], -primary[idx]))
            chosen = idx[order[:count]]
            if len(chosen) < count:
                log.warning("classify: only %d %s units are eligible for a target of %d", len(chosen), kind, count)
            return chosen

        n_esu, n_euu, n_ru = (int(round(shares[c] * n)) for c in ("esu", "euu", "ru"))
        esu = take(n_esu, s >= min_safety_rank, s - u, s)
        cls[esu], free[esu] = CLASS_CODES["esu"], False
        euu = take(n_euu, u >= min_utility_rank, u - s, u)
        cls[euu], free[euu] = CLASS_CODES["euu"], False
        ru_ = take(n_ru, np.ones(n, dtype=bool), -(s + u), -np.maximum(s, u))
        cls[ru_] = CLASS_CODES["ru"]
        for k, part in zip(keys, np.split(cls, np.cumsum([safety[k].numel() for k in keys])[:-1])):
            out[k] = torch.from_numpy(part.copy())
    return out
