"""Statistics (safety_units.utils.stats): a classifier's confusion counts, F1's bootstrap interval and AUROC, Wilson
intervals, pairwise kappa; checked on cases whose answer is known by hand."""
import math
import random

import pytest

from safety_units.utils.stats import auroc, confusion_counts, corrected_rate, f1_interval, rogan_gladen, wilson


def test_confusion_counts_count_each_cell():
    pred = [True, True, False, False, True, False]
    truth = [True, False, True, False, True, False]
    assert confusion_counts(pred, truth) == {"tp": 2, "fp": 1, "fn": 1, "tn": 2}
    with pytest.raises(ValueError, match="equal lengths"):
        confusion_counts([True], [True, False])


@pytest.mark.parametrize("scores, truth, expected", [
    ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 1.0),      # every positive above every negative
    ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),      # every positive below
    ([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], 0.5),      # all tied: each pair counts half
    ([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0], 0.75),     # 3 of the 4 (positive, negative) pairs ordered right
])
def test_auroc_is_the_share_of_pairs_ranked_right(scores, truth, expected):
    assert auroc(scores, truth) == expected


def test_auroc_without_both_classes_is_nan_and_matches_the_pairwise_definition():
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounding makes ties
    truth = [rng.random() < 0.4 for _ in range(60)]
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, truth) == pytest.approx(pairwise)


def test_f1_interval_is_seeded_brackets_f1_and_is_a_point_when_perfect():
    rng = random.Random(1)
    truth = [rng.random() < 0.5 for _ in range(200)]
    pred = [t if rng.random() < 0.8 else not t for t in truth]
    c = confusion_counts(pred, truth)
    f1 = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])
    lo, hi = f1_interval(pred, truth, n_boot=500, seed=3)
    assert lo < f1 < hi and hi - lo < 0.2
    assert f1_interval(pred, truth, n_boot=500, seed=3) == (lo, hi)
    assert f1_interval(pred, truth, n_boot=500, seed=4) != (lo, hi)
    assert f1_interval(truth, truth, n_boot=200) == (1.0, 1.0)
    assert all(math.isnan(x) for x in f1_interval([], []))


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi and lo == pytest.approx(0.2189, abs=1e-4) and hi == pytest.approx(0.3958, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert round(lo, 4) == 0.2366 and round(hi, 4) == 0.7634
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


def test_pairwise_kappa_covers_every_pair_once():
    from safety_units.utils.stats import cohen_kappa, pairwise_kappa

    votes = {"a": [1, 0, 1, 0], "b": [1, 0, 0, 0], "c": [0, 1, 0, 1]}
    k = pairwise_kappa(votes)
    assert list(k) == ["a~b", "a~c", "b~c"]
    assert k["a~b"] == cohen_kappa(votes["a"], votes["b"]) == 0.5 and k["a~c"] == -1.0


def test_rogan_gladen_undoes_a_judges_known_errors():
    # a judge with sensitivity 0.9 and specificity 0.7 sees 0.9 * 0.5 + 0.3 * 0.5 = 0.6 on a true rate of 0.5
    assert rogan_gladen(0.6, 0.9, 0.7) == pytest.approx(0.5)
    assert rogan_gladen(0.1, 0.9, 0.7) == 0.0 and rogan_gladen(1.0, 0.9, 0.7) == 1.0  # clipped
    assert math.isnan(rogan_gladen(0.5, 0.5, 0.5))  # an uninformative judge


def test_the_corrected_rate_interval_carries_the_judges_uncertainty():
    flags = [1] * 300 + [0] * 200
    small = corrected_rate(flags, tp=90, fn=10, tn=70, fp=30)  # validated on 200 labels
    large = corrected_rate(flags, tp=9000, fn=1000, tn=7000, fp=3000)  # the same rates on 20,000
    assert small["raw"] == 0.6 and small["corrected"] == pytest.approx(0.5) == large["corrected"]
    assert small["ci"][0] < 0.5 < small["ci"][1] and large["ci"][0] < 0.5 < large["ci"][1]
    assert small["ci"][1] - small["ci"][0] > 1.5 * (large["ci"][1] - large["ci"][0])
    assert corrected_rate(flags, 90, 10, 70, 30) == small  # seeded
    with pytest.raises(ValueError, match="both classes"):
        corrected_rate(flags, 0, 0, 70, 30)
