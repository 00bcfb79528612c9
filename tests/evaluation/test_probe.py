"""Linear probes: split, logistic fit, L2 selection, scoring, degenerate labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from fedpanfm.config import EvalConfig
from fedpanfm.evaluation.embed import Embeddings
from fedpanfm.evaluation.probe import fit_and_score, fit_logistic, fit_probes, score_probes, split_three

ORGANS = ("brain", "heart")


def synthetic_embeddings(n: int = 300, d: int = 8, seed: int = 0) -> Embeddings:
    """label 'separable' is linear in the embedding; 'rare' is a separable 10 % minority;
    'noise' is independent of it; a few labels are unknown (NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3.0 + 5.0  # off-centre and scaled: standardisation matters
    v = torch.randn(d, generator=g)
    proj = (x - 5.0) @ v
    separable = (proj > 0).float()
    rare = (proj > torch.quantile(proj, 0.9)).float()
    noise = torch.randint(0, 2, (n,), generator=g).float()
    labels = torch.stack([separable, rare, noise], 1)
    labels[torch.randperm(n, generator=g)[:15], 0] = math.nan
    return Embeddings(
        subject_ids=[f"s{i:03d}" for i in range(n)], cls=x, shares=torch.full((n, 2), 0.5),
        present=torch.ones(n, 2, dtype=torch.bool), labels=labels,
        label_names=("separable", "rare", "noise"), organ_names=ORGANS,
    )


def test_split_is_subject_level_disjoint_and_deterministic():
    ids = [f"site{k}_{i}" for k in range(3) for i in range(40)]
    a = split_three(ids, 0.2, 0.3, seed=5)
    b = split_three(list(reversed(ids)), 0.2, 0.3, seed=5)  # order of the ids does not matter
    assert a == b
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == len(ids) and set().union(*parts) == set(ids)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(a.test) == 36 and len(a.val) == 24
    assert split_three(ids, 0.2, 0.3, seed=6) != a
    with pytest.raises(ValueError, match="below 1"):
        split_three(ids, 0.5, 0.5, seed=0)


def test_fit_logistic_reaches_the_weighted_optimum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(80, generator=g, dtype=torch.float64) > 1.0).double()  # imbalanced
    l2 = torch.tensor([0.01, 1.0], dtype=torch.float64)
    w, b = fit_logistic(x, y, l2, max_iter=200)
    # independent check: the gradient of the class-weighted, L2-penalised objective vanishes
    pw = torch.tensor(float((1 - y).sum() / y.sum()), dtype=torch.float64)
    for k in range(2):
        wk, bk = w[k].clone().requires_grad_(True), b[k].clone().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(x @ wk + bk, y, pos_weight=pw) + 0.5 * l2[k] * (wk * wk).sum()
        gw, gb = torch.autograd.grad(loss, [wk, bk])
        assert gw.abs().max() < 1e-5 and abs(float(gb)) < 1e-5
    assert w[1].norm() < w[0].norm()  # stronger L2, smaller weights
    with pytest.raises(ValueError, match="one class"):
        fit_logistic(x, torch.zeros(80, dtype=torch.float64), l2, 10)


def test_probe_learns_separable_labels_and_not_noise():
    emb = synthetic_embeddings()
    split = split_three(emb.subject_ids, 0.2, 0.3, seed=0)
    cfg = EvalConfig(bootstrap=200)
    probes, scores = fit_and_score(emb, split, cfg, seed=0)
    by = {s.label: s for s in scores.labels}
    assert by["separable"].auroc > 0.95 and by["rare"].auroc > 0.95
    assert abs(by["noise"].auroc - 0.5) < 0.15
    # unknown labels are left out of that label only
    test = emb.subset(split.test)
    assert by["separable"].n == int((~torch.isnan(test.labels[:, 0])).sum()) < len(split.test)
    assert by["noise"].n == len(split.test)
    assert by["separable"].ci_low <= by["separable"].auroc <= by["separable"].ci_high
    assert scores.macro == pytest.approx(sum(s.auroc for s in scores.labels) / 3)
    assert scores.macro_ci_low < scores.macro < scores.macro_ci_high
    for name in emb.label_names:
        assert probes.probes[name].l2 in cfg.l2_grid


def test_degenerate_labels_are_reported_not_fatal():
    emb = synthetic_embeddings(n=60)
    emb.labels[:, 1] = 0.0  # one class everywhere: no probe can be fitted
    split = split_three(emb.subject_ids, 0.2, 0.3, seed=0)
    test_rows = [emb.subject_ids.index(s) for s in split.test]
    emb.labels[test_rows, 2] = 1.0  # one class in test only: probe fitted, AUROC undefined
    probes, scores = fit_and_score(emb, split, EvalConfig(bootstrap=50), seed=0)
    by = {s.label: s for s in scores.labels}
    assert "rare" not in probes.probes and "no probe" in probes.notes["rare"]
    assert math.isnan(by["rare"].auroc) and "no probe" in by["rare"].note
    assert math.isnan(by["noise"].auroc) and "one class" in by["noise"].note
    assert scores.n_macro_labels == 1 and scores.macro == pytest.approx(by["separable"].auroc)


def test_untunable_l2_is_noted():
    emb = synthetic_embeddings(n=60)
    split = split_three(emb.subject_ids, 0.2, 0.3, seed=0)
    val_rows = [emb.subject_ids.index(s) for s in split.val]
    emb.labels[val_rows, 2] = 0.0
    cfg = EvalConfig()
    probes = fit_probes(emb.subset(split.train), emb.subset(split.val), cfg)
    p = probes.probes["noise"]
    assert "not tuned" in p.note and p.l2 == sorted(cfg.l2_grid)[len(cfg.l2_grid) // 2]
    assert probes.probes["separable"].note == ""
    with pytest.raises(ValueError, match="labels"):
        score_probes(probes, Embeddings([], torch.zeros(0, 8), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool),
                                        torch.zeros(0, 1), ("other",), ORGANS))


def test_choose_l2_never_takes_the_largest_unless_it_is_strictly_best():
    from fedpanfm.evaluation.probe import choose_l2

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert choose_l2(t(0.6, 0.8, 0.8, 0.7)) == 2  # a tie inside the grid: the stronger L2
    assert choose_l2(t(0.6, 0.7, 0.7, 0.7)) == 1  # saturated up to the end: the weakest of that run
    assert choose_l2(t(0.6, 0.7, 0.8)) == 2  # strictly best at the end: fit_probes extends the grid


def _weak_dense(n: int, d: int, seed: int) -> Embeddings:
    """A signal spread thinly over many dimensions, few subjects: strong L2 wins (the probe
    direction tends to the class-mean difference, the optimum for isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g).float()
    x = torch.randn(n, d, generator=g) + 0.08 * (2 * y[:, None] - 1)
    return Embeddings([f"s{i:04d}" for i in range(n)], x, torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool),
                      y[:, None], ("y",), ("brain",))


def test_l2_grid_is_extended_when_its_largest_value_wins():
    emb = _weak_dense(240, 150, seed=1)
    split = split_three(emb.subject_ids, 0.3, 0.3, seed=0)
    short = EvalConfig(l2_grid=[1e-4, 1e-3], l2_extend=0, bootstrap=0)
    longer = EvalConfig(l2_grid=[1e-4, 1e-3], l2_extend=6, bootstrap=0)
    p_short, s_short = fit_and_score(emb, split, short)
    p_long, s_long = fit_and_score(emb, split, longer)
    assert p_short.probes["y"].l2 == 1e-3  # the grid's top: a larger one would be better ...
    probe = p_long.probes["y"]
    assert probe.l2 > 1e-3 and probe.l2_extended >= 1 and "extended" in probe.note  # ... and is found
    assert probe.val_auroc > p_short.probes["y"].val_auroc
    assert s_long.macro > s_short.macro + 0.03
    # The default grid reaches far enough here: its largest value is not the one chosen.
    p_def, _ = fit_and_score(emb, split, EvalConfig(bootstrap=0))
    assert p_def.probes["y"].l2 < max(EvalConfig().l2_grid) and p_def.probes["y"].l2_extended == 0


def test_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(11)
    n, d = 600, 10
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + 1.0
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid((x - 1.0) @ w / 2 - 1.0)).float()
    emb = Embeddings([f"s{i:04d}" for i in range(n)], x.float(), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool),
                     y[:, None], ("y",), ("brain",))
    split = split_three(emb.subject_ids, 0.2, 0.3, seed=0)
    probes, scores = fit_and_score(emb, split, EvalConfig(bootstrap=0))
    p = probes.probes["y"]
    tr, te = emb.subset(split.train), emb.subset(split.test)
    xtr, xte = tr.cls.double().numpy(), te.cls.double().numpy()
    mu, sd = xtr.mean(0), xtr.std(0)
    ytr = tr.labels[:, 0].numpy()
    pw = float((ytr == 0).sum() / (ytr == 1).sum())
    clf = LogisticRegression(C=1.0 / (p.l2 * len(ytr)), class_weight={0: 1.0, 1: pw}, max_iter=10000, tol=1e-12)
    clf.fit((xtr - mu) / sd, ytr)
    ref = roc_auc_score(te.labels[:, 0].numpy(), clf.decision_function((xte - mu) / sd))
    assert scores.macro == pytest.approx(ref, abs=1e-3) and scores.macro > 0.75
    assert p.weight.numpy() == pytest.approx(clf.coef_[0], rel=1e-3, abs=1e-4)
