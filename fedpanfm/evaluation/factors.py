"""What an embedding encodes, on a cohort whose latent factors are known (the synthetic cohort).

Probe AUROC says whether an encoder predicts disease; it does not say why not. The synthetic
cohort writes each subject's latent factors (body size, age, metabolic, renal ...) into
``cohort_metadata.json``, so we can ask directly which of them the frozen CLS embedding carries
linearly: one ridge regression per factor, fitted on the probe split's train + val subjects and
scored by R^2 on its test subjects, plus the participation ratio of the embedding covariance
(how many directions the embedding really uses). Our diagnostic, not the papers'; it found that
self-distillation on our small cohorts collapses the CLS onto body size (docs/results.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedpanfm.data.dataset import list_sites
from fedpanfm.data.synthetic import METADATA_NAME
from fedpanfm.evaluation.embed import Embeddings
from fedpanfm.evaluation.probe import ProbeSplit

#: (subject id -> factor -> value, factors the labels read, nuisance factors).
CohortFactors = tuple[dict[str, dict[str, float]], tuple[str, ...], tuple[str, ...]]


@dataclass
class FactorReport:
    """Linear decodability of each latent factor from the embedding.

    Args:
        r2: factor -> test R^2 of a ridge regression on the standardised embedding (can be
            negative: worse than predicting the test mean).
        participation_ratio: ``(sum lambda)^2 / sum lambda^2`` of the embedding covariance
            eigenvalues, between 1 (one direction) and D (isotropic).
        nuisance: the factors no label reads (their R^2 is the shortcut, not the signal).
        n_fit: subjects the regressions were fitted on; n_test: subjects they were scored on.
    """

    r2: dict[str, float]
    participation_ratio: float
    nuisance: tuple[str, ...] = ()
    n_fit: int = 0
    n_test: int = 0
    signal_factors: tuple[str, ...] = field(default=())

    @property
    def signal_r2(self) -> float:
        """Mean R^2 over the factors labels read (``signal_factors``), NaN if none."""
        v = [self.r2[f] for f in self.signal_factors if f in self.r2]
        return sum(v) / len(v) if v else math.nan


def load_cohort_factors(cohort_dir: Path) -> CohortFactors | None:
    """Latent factors of every subject of a synthetic cohort, or None for a cohort without them.

    Args:
        cohort_dir: the cohort folder (``cohort_metadata.json`` beside the site folders).

    Returns:
        (subject id -> factor -> value, factors the labels read, nuisance factors), or None.

    Raises:
        ValueError: the metadata file exists but lacks the subjects' factors (names the file).
    """
    path = Path(cohort_dir) / METADATA_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    try:
        subjects = {s["subject_id"]: {k: float(v) for k, v in s["factors"].items()} for s in meta["subjects"]}
        nuisance = tuple(meta["factors"]["nuisance"])
        labels = meta["labels"]
        signal = tuple(dict.fromkeys(f for m in labels.values() for f in m["weights"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a synthetic cohort metadata file with subject factors ({exc!r})") from None
    list_sites(Path(cohort_dir))  # the folder must be a cohort, not a stray metadata file
    return subjects, signal, nuisance


def participation_ratio(x: Tensor) -> float:
    """Effective number of directions of the rows of ``x`` (N, D): ``(tr C)^2 / tr(C^2)``."""
    if x.shape[0] < 2:
        return math.nan
    ev = torch.linalg.eigvalsh(torch.cov(x.double().T).reshape(x.shape[1], x.shape[1])).clamp(min=0.0)
    total = float(ev.sum())
    return total * total / float((ev * ev).sum()) if total > 0 else math.nan


def ridge_r2(x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor, l2: float = 1.0) -> Tensor:
    """Test R^2 of one ridge regression per column of ``y``, on standardised features.

    Args:
        x_fit, x_test: (N, D) features; standardised with ``x_fit``'s mean and std.
        y_fit, y_test: (N, F) targets.
        l2: ridge penalty on the weights (not the intercept).

    Returns:
        (F,) float64 R^2 = 1 - mean squared error / variance of ``y_test``.
    """
    mu, sd = x_fit.double().mean(0), x_fit.double().std(0).clamp(min=1e-9)

    def design(x: Tensor) -> Tensor:
        z = (x.double() - mu) / sd
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)

    a, b = design(x_fit), design(x_test)
    penalty = l2 * torch.eye(a.shape[1], dtype=a.dtype)
    penalty[-1, -1] = 0.0
    w = torch.linalg.solve(a.T @ a + penalty, a.T @ y_fit.double())
    resid = ((y_test.double() - b @ w) ** 2).mean(0)
    return 1.0 - resid / y_test.double().var(0, unbiased=False).clamp(min=1e-12)


def factor_decodability(
    emb: Embeddings,
    split: ProbeSplit,
    factors: Mapping[str, Mapping[str, float]],
    signal: Sequence[str],
    nuisance: Sequence[str],
    l2: float = 1.0,
) -> FactorReport:
    """R^2 of every Gaussian latent factor from the CLS embedding, and its participation ratio.

    Args:
        emb: the all-organ embeddings of the cohort.
        split: the probe split (regressions fit on train + val, scored on test).
        factors: subject id -> factor -> value (:func:`load_cohort_factors`).
        signal: factors the labels read; nuisance: factors no label reads.
        l2: ridge penalty.

    Raises:
        KeyError: an embedded subject has no factors (names it).
    """
    missing = [s for s in emb.subject_ids if s not in factors]
    if missing:
        raise KeyError(f"factor_decodability: no factors for subject(s) {', '.join(missing[:5])}")
    # Derived or non-Gaussian columns (age in years duplicates age; the cardiac phase is uniform)
    # are kept only if the labels or the nuisance list name them.
    names = [f for f in dict.fromkeys([*nuisance, *signal]) if f in factors[emb.subject_ids[0]]]
    fit_ids, test_ids = [*split.train, *split.val], list(split.test)
    fit, test = emb.subset(fit_ids), emb.subset(test_ids)
    y = lambda ids: torch.tensor([[factors[s][f] for f in names] for s in ids], dtype=torch.float64)  # noqa: E731
    r2 = ridge_r2(fit.cls, y(fit_ids), test.cls, y(test_ids), l2)
    return FactorReport(
        r2=dict(zip(names, r2.tolist())),
        participation_ratio=participation_ratio(emb.cls),
        nuisance=tuple(f for f in nuisance if f in names),
        n_fit=len(fit_ids),
        n_test=len(test_ids),
        signal_factors=tuple(f for f in signal if f in names and f not in nuisance),
    )


__all__ = ["CohortFactors", "FactorReport", "factor_decodability", "load_cohort_factors", "participation_ratio", "ridge_r2"]
