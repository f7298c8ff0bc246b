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
every unit gets exactly one class. That is `classify.method=shares` (default): the class sizes are inputs.

`classify.method=set_difference` (Wei et al. 2024) makes them an outcome. With S = the top `top_safety` share of
units by safety score and U = the top `top_utility` share by utility score (within each layer, or over all layers
of a kind with global normalisation):

    ESU = S - U,   EUU = U - S,   RU = bottom `bottom` share on both (and in neither S nor U),   CU = the rest.

A unit is in the top p share when fewer than p * n units score strictly higher (bottom: lower), so tied scores are
all in or all out.
"""

from __future__ import annotations


import numpy as np
import torch

from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

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


def normalise(scores: dict[str, torch.Tensor], mode: str = "per_layer", ranks=percentile_ranks) -> dict[str, torch.Tensor]:
    """Percentile ranks per key ('mlp.3') for per_layer, or over all keys of a kind for global (`ranks` maps one
    score vector to its ranks)."""
    if mode == "per_layer":
        return {k: ranks(v) for k, v in scores.items()}
    if mode == "global":
        out = {}
        for kind in sorted({k.split(".")[0] for k in scores}):
            keys = [k for k in scores if k.split(".")[0] == kind]
            flat = ranks(torch.cat([scores[k].double().flatten() for k in keys]))
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


def share_above(x: torch.Tensor) -> torch.Tensor:
    """For each entry, the share of entries strictly larger (0 for the maximum)."""
    v = x.detach().double().cpu().numpy()
    above = v.size - np.searchsorted(np.sort(v), v, side="right")
    return torch.from_numpy(above / v.size)


def share_below(x: torch.Tensor) -> torch.Tensor:
    """For each entry, the share of entries strictly smaller (0 for the minimum)."""
    v = x.detach().double().cpu().numpy()
    return torch.from_numpy(np.searchsorted(np.sort(v), v, side="left") / v.size)


def _check_share(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"classify.{name} must be a share in [0, 1], got {value!r}.")
    return float(value)


def classify_set_difference(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor],
                            top_safety: float = 0.05, top_utility: float = 0.05, bottom: float = 0.3,
                            normalization: str = "per_layer") -> dict[str, torch.Tensor]:
    """ESU = top-p by safety minus top-q by utility, EUU = the mirror, RU = bottom share on both, CU = the rest.

    Class sizes are an outcome of the scores (uint8 class codes per key, as `classify`)."""
    p, q, r = (_check_share(k, v) for k, v in (("top_safety", top_safety), ("top_utility", top_utility),
                                                 ("bottom", bottom)))
    if set(safety) != set(utility):
        raise ConfigError("safety and utility scores cover different units.")
    eps = 1e-9  # shares are float quotients: 3 / 10 above must not count as "fewer than 0.3"
    s_above, u_above = normalise(safety, normalization, share_above), normalise(utility, normalization, share_above)
    s_below, u_below = normalise(safety, normalization, share_below), normalise(utility, normalization, share_below)
    out = {}
    for k, score in safety.items():
        top_s, top_u = s_above[k] < p - eps, u_above[k] < q - eps
        low = (s_below[k] < r - eps) & (u_below[k] < r - eps) & ~top_s & ~top_u
        cls = torch.full((score.numel(),), CLASS_CODES["cu"], dtype=torch.uint8)
        cls[top_s & ~top_u] = CLASS_CODES["esu"]
        cls[top_u & ~top_s] = CLASS_CODES["euu"]
        cls[low] = CLASS_CODES["ru"]
        out[k] = cls.reshape(score.shape)
    return out


CLASSIFY_METHODS = ("shares", "set_difference")


def classify_from_config(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor],
                         cfg: dict) -> dict[str, torch.Tensor]:
    """Class codes per key with the settings of a `classify` config group entry (a plain dict)."""
    method = cfg.get("method", "shares")
    normalization = cfg.get("normalization", "per_layer")
    if method == "shares":
        return classify(safety, utility, shares=cfg.get("shares"), normalization=normalization,
                        min_safety_rank=cfg.get("min_safety_rank", 0.5),
                        min_utility_rank=cfg.get("min_utility_rank", 0.5))
    if method == "set_difference":
        return classify_set_difference(safety, utility, top_safety=cfg.get("top_safety", 0.05),
                                       top_utility=cfg.get("top_utility", 0.05), bottom=cfg.get("bottom", 0.3),
                                       normalization=normalization)
    raise ConfigError(f"classify.method must be one of {CLASSIFY_METHODS}, got {method!r}.")


def class_shares(classes: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Share of each class per unit kind: {"mlp": {"esu": 0.012, ...}, "attn": {...}}."""
    out = {}
    for kind in sorted({k.split(".")[0] for k in classes}):
        c = torch.cat([v.flatten() for k, v in classes.items() if k.split(".")[0] == kind])
        out[kind] = {name: round(int((c == code).sum()) / c.numel(), 5) for name, code in CLASS_CODES.items()}
    return out
