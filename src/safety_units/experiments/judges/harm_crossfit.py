"""Out-of-fold validation of the harm-judge candidates on every labelled BeaverTails 30k_test pair (k-fold
cross-fitting by prompt), and their final heads trained on all folds (experiments.judges.harm_report writes it up).

Candidates (CANDIDATES, fixed before any number): the v1 probe's recipe (conf/harm_judge/probe.yaml, one layer,
mean pool, logistic), `layers` (four layers, mean and last-token pools, logistic) and `mlp` (the same features, an
MLP head) -- each alone and AND not a PatternJudge refusal -- plus `ensemble`, the mean of the layers and mlp
probabilities, AND not a refusal. All train on `train.prompts=all` rows: the 3,021 labelled pairs, the attack pool
(harmful) and refusals (unharmful).

Folds: fold(prompt) = floor(k * stable_fraction("fold " + prompt)), so one prompt never sits on both sides. For fold
f, a head trains on the labelled pairs outside f plus the auxiliary rows whose prompt is not in f, exactly as the
deployed judge trains (random response cuts, harm.HarmProbeJudge.training_inputs), and predicts the pairs of f, cut
to `cut_tokens` tokens as generations are. Every pair thus gets a prediction from a head that never saw its prompt.
The backbone states are computed once for all candidates (the union of their layers, both pools).
"""

from __future__ import annotations

import time

import torch

from safety_units.data.sources import stable_fraction
from safety_units.evaluation.judges.harm import HarmProbeJudge, beavertails_pairs, degenerate, zero_degenerate
from safety_units.evaluation.judges.harm_features import POOLS
from safety_units.evaluation.judges.heads import probability
from safety_units.evaluation.judges.refusal import PatternJudge
from safety_units.utils.config import compose_config, instantiate
from safety_units.utils.errors import ConfigError

CANDIDATES = ("probe", "layers", "mlp")  # conf/harm_judge/<name>.yaml
OFF_TOPIC = 1000  # benign answers paired with harmful prompts in every candidate's training rows (train.off_topic)
ENSEMBLE = ("layers", "mlp")  # averaged, AND not a refusal


def fold_of(prompt: str, k: int) -> int:
    return min(k - 1, int(k * stable_fraction("fold " + prompt)))


def candidate_judges(overrides: list[str]) -> dict[str, HarmProbeJudge]:
    """Each candidate's judge on every labelled pair (train.prompts=all), heads not trained yet."""
    out = {}
    for name in CANDIDATES:
        cfg = compose_config("evaluate", [f"+harm_judge={name}", "harm_judge.train.prompts=all",
                                          f"harm_judge.train.off_topic.limit={OFF_TOPIC}",
                                          "harm_judge.train_if_missing=false", *overrides])
        out[name] = instantiate(cfg.harm_judge, "harm_judge")
    base = out[CANDIDATES[0]]
    for name, j in out.items():
        if [r["prompt"] for r in j.training_rows] != [r["prompt"] for r in base.training_rows]:
            raise ConfigError(f"harm judge candidate {name} trains on other rows than {CANDIDATES[0]}: the "
                              "cross-fitting needs one training set (same train.* settings).")
    return out


def _slice(states: torch.Tensor, union: list[int], judge: HarmProbeJudge) -> torch.Tensor:
    """A candidate's features from the union states [n, len(union), pools, d]."""
    idx = [union.index(layer) for layer in judge.layers]
    pools = [POOLS.index(p) for p in judge.pools]
    return states[:, idx][:, :, pools].reshape(states.shape[0], -1)


def crossfit(overrides: list[str], k: int = 5, cut_tokens: int = 64, threads: int = 2,
             degenerate_prompts: int = 20) -> dict:
    """Out-of-fold probabilities of every candidate on the labelled pairs, plus the final heads (saved to each
    judge's cache) and their verdicts on degenerate answers. The JSON the report renders from."""
    torch.set_num_threads(threads)
    judges = candidate_judges(overrides)
    base = judges[CANDIDATES[0]]
    union = sorted({layer for j in judges.values() for layer in j.layers})
    widest = max(judges.values(), key=lambda j: len(j.layers))
    if widest.layers != union:
        raise ConfigError(f"the candidates' layers {union} must all be those of one candidate ({widest.layers}).")
    t0 = time.time()
    prompts, responses, labels = base.training_inputs()
    train_states = widest.states(prompts, responses, "harm crossfit: training pairs")
    rows = beavertails_pairs(base.train["beavertails"])
    tok = base.tokenizer
    cut = [tok.decode(tok(r["response"], add_special_tokens=False)["input_ids"][:cut_tokens]) for r in rows]
    test_states = widest.states([r["prompt"] for r in rows], cut, "harm crossfit: labelled pairs")
    t_features = time.time() - t0

    folds = [fold_of(r["prompt"], k) for r in rows]
    train_folds = [fold_of(p, k) for p in prompts]
    is_labelled = [r["source"] == "beavertails" for r in base.training_rows]
    oof: dict[str, list[float]] = {name: [0.0] * len(rows) for name in judges}
    t0 = time.time()
    for f in range(k):
        keep = torch.tensor([tf != f for tf in train_folds])  # labelled or not: no prompt of fold f trains
        test = [i for i, g in enumerate(folds) if g == f]
        for name, j in judges.items():
            params = j.fit(_slice(train_states[keep], union, j), labels[keep])
            probs = probability(_slice(test_states[test], union, j), params).tolist()
            for i, p in zip(test, zero_degenerate(probs, [cut[i] for i in test])):
                oof[name][i] = p
    t_folds = time.time() - t0
    t0 = time.time()
    final = {}
    for name, j in judges.items():  # the deployed heads: every row, cached where the judge looks
        x = _slice(train_states, union, j)
        j.save(j.fit(x, labels), x, labels)
        final[name] = {"cache": str(j.path), **{k_: v for k_, v in j.info.items() if k_ != "cache"}}
    t_final = time.time() - t0
    refusal = [v.refusal for v in PatternJudge(min_words=0).judge([r["prompt"] for r in rows], cut)]
    return {"k": k, "cut_tokens": cut_tokens, "threads": threads,
            "rows": [{"prompt": r["prompt"], "harmful": r["harmful"], "fold": f, "refusal": rf}
                     for r, f, rf in zip(rows, folds, refusal)],
            "training": {"labelled_rows": sum(is_labelled), "auxiliary_rows": len(is_labelled) - sum(is_labelled),
                         "pairs": base.info["training_pairs"]},
            "oof": oof, "candidates": final, "thresholds": {n: j.threshold for n, j in judges.items()},
            "degenerate": degenerate_verdicts(judges, rows, degenerate_prompts),
            "timing_s": {"features": round(t_features, 1), "folds": round(t_folds, 1),
                         "final_heads": round(t_final, 1), "pairs_embedded": len(prompts) + len(rows)}}


def degenerate_answers(prompts: list[str], off_topic: list[str]) -> dict[str, list[str]]:
    """What fine-tuned small models produce instead of an answer, one list per kind, one answer per prompt."""
    n = len(prompts)
    return {"empty": [""] * n, "whitespace": ["  \n "] * n,
            "repeated token": [" ".join(["the"] * 40)] * n, "repeated phrase": ["I I I I am am am " * 6] * n,
            "SST-2 label word": [["positive", "negative"][i % 2] for i in range(n)],
            "AG News label word": [["World", "Sports", "Business", "Sci/Tech"][i % 4] for i in range(n)],
            "off-topic text": off_topic[:n]}


def degenerate_verdicts(judges: dict, rows: list[dict], n: int) -> dict:
    """Each candidate's p(harmful) on degenerate answers to n harmful labelled prompts (off-topic answers: other
    pairs' unharmful responses), and whether the pattern judge sees a refusal."""
    harmful = [r["prompt"] for r in rows if r["harmful"]][:n]
    off = [r["response"] for r in rows if not r["harmful"] and not degenerate(r["response"])][-n:]
    out = {}
    for kind, answers in degenerate_answers(harmful, off).items():
        prompts = harmful[:len(answers)]
        out[kind] = {"n": len(answers), "example": answers[0][:60],
                     "refusal": [v.refusal for v in PatternJudge(min_words=0).judge(prompts, answers)],
                     "p": {name: j.probabilities(prompts, answers) for name, j in judges.items()}}
    return out
