"""Paired statistics for comparing two runs on the same prompts, agreement between judges, a binary classifier
against labels, prompt-list hashes.

* `mcnemar_exact(a, b)`: two-sided exact McNemar test on paired binary outcomes (binomial on the discordant pairs).
* `paired_bootstrap(a, b)`: the difference mean(b) - mean(a) with a 95% percentile interval, resampling prompts.
* `hierarchical_bootstrap(pairs)`: the difference mean(a) - mean(b) over seeds x prompts, resampling seeds, then
  prompts within each seed (paired), with a 95% interval and a two-sided p.
* `cohen_kappa(a, b)`: chance-corrected agreement of two binary raters.
* `prompt_list_hash(prompts)`: a short hash of an ordered prompt list (what makes two evaluations comparable).
* `wilson(k, n)`: the 95% Wilson score interval of a proportion.
* `confusion_counts(pred, truth)`, `f1_interval(pred, truth)`, `auroc(scores, truth)`: a binary classifier (the
  positive class is True) against labels: its confusion matrix, F1's percentile-bootstrap interval, its AUROC.
* `rogan_gladen(raw, sens, spec)`, `corrected_rate(flags, tp, fn, tn, fp)`: a judge's positive rate corrected for
  its validated sensitivity and specificity, with an interval that carries both the sampling and the judge's error.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence


def _check_paired(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}.")


def mcnemar_exact(a: Sequence[bool | int], b: Sequence[bool | int]) -> float:
    """Two-sided exact McNemar p-value: under H0 each discordant pair is a fair coin flip."""
    _check_paired(a, b)
    n01 = sum(1 for x, y in zip(a, b) if not x and y)
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    # P(X <= k) for X ~ Bin(n, 1/2), doubled; exact with integers, capped at 1.
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     statistic=None) -> tuple[float, float, float]:
    """(difference, 95% low, 95% high) of statistic(b) - statistic(a) over prompts resampled together.

    `statistic` maps a list of per-prompt values to a number (default: the mean); perplexity passes its own."""
    _check_paired(a, b)
    if not a:
        return (float("nan"), float("nan"), float("nan"))
    stat = statistic or (lambda xs: sum(xs) / len(xs))
    diff = stat(list(b)) - stat(list(a))
    rng = random.Random(f"paired-bootstrap:{seed}")
    n = len(a)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(stat([b[i] for i in idx]) - stat([a[i] for i in idx]))
    boots.sort()
    return (diff, boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1])


def hierarchical_bootstrap(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 4000,
                           seed: int = 0) -> dict:
    """a minus b when the variance is in two levels: `pairs` holds, per seed, the per-prompt outcomes of a and of b
    on the same prompts. Each resample draws seeds with replacement, then within each drawn seed the prompts with
    replacement (the same indices for a and b), and takes the mean over the drawn seeds of the per-seed mean
    differences. Returns {diff, ci: (2.5%, 97.5%), p: two-sided (twice the smaller tail share of resamples at or
    beyond 0), n_seeds, n_boot}. One seed reduces it to the paired prompt bootstrap."""
    if not pairs:
        raise ValueError("hierarchical_bootstrap: no seeds")
    for a, b in pairs:
        _check_paired(a, b)
        if not a:
            raise ValueError("hierarchical_bootstrap: a seed with no prompts")
    diffs = [[x - y for x, y in zip(a, b)] for a, b in pairs]
    point = sum(sum(d) / len(d) for d in diffs) / len(diffs)
    rng = random.Random(f"hierarchical-bootstrap:{seed}")
    k, boots = len(diffs), []
    for _ in range(n_boot):
        total = 0.0
        for _ in range(k):
            d = diffs[rng.randrange(k)]
            n = len(d)
            total += sum(d[rng.randrange(n)] for _ in range(n)) / n
        boots.append(total / k)
    boots.sort()
    below = sum(1 for x in boots if x <= 0) / n_boot
    above = sum(1 for x in boots if x >= 0) / n_boot
    return {"diff": point, "ci": (boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]),
            "p": min(1.0, 2 * min(below, above)), "n_seeds": k, "n_boot": n_boot}


def cohen_kappa(a: Sequence[bool | int], b: Sequence[bool | int]) -> float:
    """Cohen's kappa of two binary raters; 1.0 when both are constant and agree, nan when undefined."""
    _check_paired(a, b)
    n = len(a)
    if n == 0:
        return float("nan")
    po = sum(1 for x, y in zip(a, b) if bool(x) == bool(y)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe == 1.0:
        return 1.0 if po == 1.0 else float("nan")
    return (po - pe) / (1 - pe)


def pairwise_kappa(votes: dict[str, Sequence[bool | int]]) -> dict[str, float]:
    """Cohen's kappa of every pair of raters, keyed "a~b" in the order the raters are given."""
    names = list(votes)
    return {f"{a}~{b}": cohen_kappa(votes[a], votes[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def prompt_list_hash(prompts: Sequence[str]) -> str:
    """sha256 (first 16 hex digits) of the ordered prompt list; equal hashes = the same prompts in the same order."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion_counts(pred: Sequence[bool], truth: Sequence[bool]) -> dict[str, int]:
    """{"tp", "fp", "fn", "tn"} of binary predictions against binary labels (True is the positive class)."""
    _check_paired(pred, truth)
    pairs = [(bool(p), bool(t)) for p, t in zip(pred, truth)]
    return {"tp": pairs.count((True, True)), "fp": pairs.count((True, False)),
            "fn": pairs.count((False, True)), "tn": pairs.count((False, False))}


def f1_interval(pred: Sequence[bool], truth: Sequence[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of F1 (True is the positive class), resampling (prediction, label) pairs
    together; seeded, so the same inputs give the same interval. F1 is not a proportion: no Wilson interval."""
    import torch  # torch's generator and quantile: the intervals the shipped reports were computed with

    _check_paired(pred, truth)
    if not pred:
        return (float("nan"), float("nan"))
    p, t = torch.tensor(list(pred), dtype=torch.bool), torch.tensor(list(truth), dtype=torch.bool)
    n = len(p)
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    bp, bt = p[idx], t[idx]
    btp = (bp & bt).sum(1).double()
    f1s = 2 * btp / (2 * btp + (bp & ~bt).sum(1) + (~bp & bt).sum(1)).double().clamp_min(1)
    return (float(f1s.quantile(0.025)), float(f1s.quantile(0.975)))


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative (ties count half); nan
    without both classes."""
    _check_paired(scores, truth)
    pos = sorted(s for s, t in zip(scores, truth) if t)
    neg = [s for s, t in zip(scores, truth) if not t]
    wins = sum(len(pos) - bisect.bisect_right(pos, s) + 0.5 * (bisect.bisect_right(pos, s) - bisect.bisect_left(pos, s))
               for s in neg)
    return wins / (len(pos) * len(neg)) if pos and neg else float("nan")


def rogan_gladen(raw: float, sensitivity: float, specificity: float) -> float:
    """The true rate behind a judge's observed positive rate `raw`, given its sensitivity and specificity
    (Rogan & Gladen 1978), clipped to [0, 1]; nan when sensitivity + specificity <= 1 (the judge carries no
    information)."""
    informed = sensitivity + specificity - 1
    if informed <= 0:
        return float("nan")
    return min(1.0, max(0.0, (raw + specificity - 1) / informed))


def corrected_rate(flags: Sequence[bool | int], tp: int, fn: int, tn: int, fp: int, n_boot: int = 2000,
                   seed: int = 0) -> dict:
    """A judge's positive rate over `flags` corrected for its validated errors (counts on human labels: tp, fn on
    true positives, tn, fp on true negatives), with a 95% percentile-bootstrap interval that carries both errors:
    each resample draws the flags with replacement and the validation counts from their binomials."""
    n, k = len(flags), sum(bool(f) for f in flags)
    if not n or not tp + fn or not tn + fp:
        raise ValueError("corrected_rate needs flags and validation counts of both classes.")
    import numpy as np  # here: vectorised binomial draws for this bootstrap only

    sens, spec = tp / (tp + fn), tn / (tn + fp)
    rng = np.random.default_rng(seed)
    raw = rng.binomial(n, k / n, n_boot) / n
    s, c = rng.binomial(tp + fn, sens, n_boot) / (tp + fn), rng.binomial(tn + fp, spec, n_boot) / (tn + fp)
    boots = sorted(v for v in (rogan_gladen(*map(float, x)) for x in zip(raw, s, c)) if v == v)  # nan: an uninformative draw
    lo, hi = (boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]) if boots else \
        (float("nan"), float("nan"))
    return {"raw": k / n, "corrected": rogan_gladen(k / n, sens, spec), "ci": [lo, hi], "n": n,
            "sensitivity": sens, "specificity": spec,
            "method": f"Rogan-Gladen; percentile bootstrap, {n_boot} resamples of the flags and of the judge's "
                      f"validation counts (binomial), seed {seed}"}
