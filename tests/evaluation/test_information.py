"""Information share: probes refitted without an organ, against full-organ probes scored without it."""

from __future__ import annotations

import math

import pytest
import torch

from fedpanfm.config import EvalConfig
from fedpanfm.evaluation.attention import attention_balance, drop_shares
from fedpanfm.evaluation.embed import Embeddings
from fedpanfm.evaluation.information import kept_split, refit_drop
from fedpanfm.evaluation.probe import fit_and_score, fit_probes, score_probes, split_three


def _emb(cls: torch.Tensor, y: torch.Tensor, ids: list[str]) -> Embeddings:
    n = len(ids)
    return Embeddings(ids, cls, torch.full((n, 2), 0.5), torch.ones(n, 2, dtype=torch.bool),
                      y.unsqueeze(1), ("disease",), ("a", "b"))


@pytest.fixture(scope="module")
def data() -> tuple[Embeddings, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 600
    signal, nuisance = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = (signal + 0.5 * torch.randn(n, generator=g) > 0).float()
    ids = [f"s{i:04d}" for i in range(n)]
    return _emb(torch.stack([signal, nuisance], 1), y, ids), nuisance


def test_refit_separates_information_from_embedding_shift(data) -> None:
    full, nuisance = data
    cfg = EvalConfig(bootstrap=0)
    split = split_three(full.subject_ids, cfg.val_fraction, cfg.test_fraction, 0)
    probes, scores = fit_and_score(full, split, cfg)
    assert scores.macro > 0.85
    assert refit_drop(full, probes, full, split, cfg) == 0.0  # the same embeddings: nothing lost

    # The organ's absence only moves and flips the embedding: the information is all still there.
    # The full-organ probes, scored on it, fall below chance; refitted probes lose nothing.
    shifted = _emb(torch.stack([-3.0 * full.cls[:, 0] + 5.0, full.cls[:, 1]], 1), full.labels[:, 0], full.subject_ids)
    inference = scores.macro - score_probes(probes, shifted.subset(split.test)).macro
    assert inference > 0.7
    assert abs(refit_drop(full, probes, shifted, split, cfg)) < 1e-6  # AUROC is invariant to the flip

    # The organ carried the signal: without it only the nuisance is left, and the probe is at chance.
    lost = _emb(torch.stack([torch.zeros_like(nuisance), nuisance], 1), full.labels[:, 0], full.subject_ids)
    assert refit_drop(full, probes, lost, split, cfg) > 0.3


def test_refit_scores_the_subjects_the_condition_keeps(data) -> None:
    full, _ = data
    cfg = EvalConfig(bootstrap=0)
    split = split_three(full.subject_ids, cfg.val_fraction, cfg.test_fraction, 0)
    probes, _ = fit_and_score(full, split, cfg)
    kept = full.rows(list(range(0, len(full), 2)))  # half the subjects had only this organ
    part = kept_split(split, set(kept.subject_ids))
    assert set(part.test) == set(split.test) & set(kept.subject_ids) and part.train and part.val
    refit = refit_drop(full, probes, kept, split, cfg)
    full_same = score_probes(probes, full.subset(part.test)).macro
    direct = fit_probes(kept.subset(part.train), kept.subset(part.val), cfg)
    assert refit == pytest.approx(full_same - score_probes(direct, kept.subset(part.test)).macro)
    assert math.isnan(refit_drop(full, probes, full.rows([0, 1]), split, cfg))  # no train, val and test left


def test_drop_shares_and_both_columns_of_the_balance() -> None:
    shares = drop_shares({"x": 0.03, "y": -0.02, "z": 0.01, "w": math.nan})
    assert shares["x"] == pytest.approx(0.75) and shares["y"] == 0.0 and shares["z"] == pytest.approx(0.25)
    assert math.isnan(shares["w"])
    assert all(math.isnan(v) for v in drop_shares({"x": -0.1, "y": 0.0}).values())  # nothing costs anything
    emb = Embeddings(["a", "b"], torch.zeros(2, 3), torch.tensor([[0.6, 0.4], [0.5, 0.5]]),
                     torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 0), (), ("x", "y"))
    bal = attention_balance(emb, {"x": -0.01, "y": 0.02}, {"x": 0.09, "y": 0.01})
    x, y = bal.organs
    assert (x.info_share, y.info_share) == (0.0, 1.0)
    assert (x.inference_share, y.inference_share) == pytest.approx((0.9, 0.1))
    assert (x.inference_drop, y.inference_drop) == (0.09, 0.01)
    assert math.isnan(attention_balance(emb, {"x": 0.1, "y": 0.1}).organs[0].inference_share)
