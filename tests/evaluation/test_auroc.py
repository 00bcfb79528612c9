"""AUROC (rank-based Mann-Whitney, average ranks for ties) and its bootstrap CI."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedpanfm.evaluation.auroc import auroc, average_ranks, bootstrap_counts, percentile_ci


def pairwise_auroc(scores: list[float], labels: list[int], weights: list[float] | None = None) -> float:
    """Independent O(n^2) count: P(score_pos > score_neg) + 0.5 P(tie), weighted pairs."""
    w = weights or [1.0] * len(scores)
    num = den = 0.0
    for i, j in itertools.product(range(len(scores)), repeat=2):
        if labels[i] == 1 and labels[j] == 0:
            pair = w[i] * w[j]
            den += pair
            num += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    return num / den if den else math.nan


def test_average_ranks_with_ties():
    r = average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    # sorted: 1 (rank 1), 2 (rank 2), 3,3,3 share ranks 3,4,5 -> 4
    assert r.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "scores,labels,expected",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # the classic example: 3 of 4 pairs ordered
        ([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1], 0.5),  # all tied
        ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),  # (1 + 0.5 + 1 + 1) / 4
        ([0.5, 0.5, 0.3, 0.7, 0.5], [1, 0, 0, 1, 1], 5 / 6),  # pos {.5,.7,.5} vs neg {.5,.3}: (.5+1+1+1+.5+1)/6
        ([3.0, 2.0, 1.0], [0, 1, 1], 0.0),  # perfectly inverted
    ],
)
def test_auroc_hand_cases(scores, labels, expected):
    got = float(auroc(torch.tensor(scores), torch.tensor(labels)))
    assert got == pytest.approx(expected, abs=1e-12)
    # rank-sum form with average ranks gives the same number
    r = average_ranks(torch.tensor(scores))
    y = torch.tensor(labels).bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    assert (float(r[y].sum()) - n1 * (n1 + 1) / 2) / (n1 * n0) == pytest.approx(expected, abs=1e-12)


def test_auroc_matches_pairwise_count_on_random_tied_data():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(2, 40, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).double()  # many ties
        labels = torch.randint(0, 2, (n,), generator=g)
        weights = torch.randint(0, 4, (3, n), generator=g).double()
        expect = pairwise_auroc(scores.tolist(), labels.tolist())
        got = float(auroc(scores, labels))
        assert (math.isnan(expect) and math.isnan(got)) or got == pytest.approx(expect, abs=1e-12), trial
        got_w = auroc(scores, labels, weights)
        for r in range(3):
            e = pairwise_auroc(scores.tolist(), labels.tolist(), weights[r].tolist())
            assert (math.isnan(e) and math.isnan(float(got_w[r]))) or float(got_w[r]) == pytest.approx(e, abs=1e-12)


def test_degenerate_labels_give_nan():
    assert math.isnan(float(auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))))
    assert math.isnan(float(auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))))
    # a bootstrap replicate that keeps only one class is NaN, the others are defined
    w = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = auroc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0, 1, 1]), w)
    assert math.isnan(float(out[0])) and float(out[1]) == 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="0 or 1"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1]))


def test_bootstrap_counts_and_percentile_ci():
    c = bootstrap_counts(10, 500, torch.Generator().manual_seed(1))
    assert c.shape == (500, 10) and torch.all(c.sum(1) == 10) and c.min() >= 0
    assert torch.equal(c, bootstrap_counts(10, 500, torch.Generator().manual_seed(1)))
    vals = torch.arange(101, dtype=torch.float64)
    vals = torch.cat([vals, torch.tensor([math.nan])])
    lo, hi = percentile_ci(vals, 0.9)
    assert lo == pytest.approx(5.0) and hi == pytest.approx(95.0)
    assert all(math.isnan(v) for v in percentile_ci(torch.tensor([math.nan]), 0.95))


def test_bootstrap_ci_covers_the_estimate():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 2, (200,), generator=g)
    s = y.double() + torch.randn(200, generator=g, dtype=torch.float64)
    point = float(auroc(s, y))
    lo, hi = percentile_ci(auroc(s, y, bootstrap_counts(200, 1000, g)), 0.95)
    assert lo < point < hi and hi - lo < 0.2
