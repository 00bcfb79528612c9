"""What an embedding encodes, on a cohort whose latent factors are known (the synthetic cohort).

Probe AUROC says whether an encoder predicts disease; it does not say why not. The synthetic
cohort writes each subject's latent factors (body size, age, metabolic, renal ...) into each
site folder's ``factors.csv`` (older cohorts: ``cohort_metadata.json``), so we can ask directly which of them the frozen CLS embedding carries
linearly: one ridge regression per factor, fitted on the probe split's train + val subjects and
scored by R^2 on its test subjects, plus the participation ratio of the embedding covariance
(how many directions the embedding really uses). Our diagnostic, not the papers'; it found that
self-distillation on our small cohorts collapses the CLS onto body size (docs/results.md).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpanfm.data.dataset import list_sites
from fedpanfm.data.synthetic import FACTORS_NAME, METADATA_NAME
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


def read_factors_csv(path: Path) -> dict[str, dict[str, float]]:
    """subject id -> factor -> value from one site's ``factors.csv``.

    The file holds a header ``subject_id,<factor>,...`` (at least one factor) and one row per
    subject with a finite float in every factor column; subject ids are unique.

    Raises:
        ValueError: the file is ill-formed (names the file, and the row and column at fault).
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: unreadable factors file ({exc})") from None
    if not rows or not rows[0] or rows[0][0].strip() != "subject_id" or len(rows[0]) < 2:
        raise ValueError(f"{path}: row 1: the header must be 'subject_id' followed by one column per factor, "
                         f"got {rows[0] if rows else 'an empty file'}")
    names = [c.strip() for c in rows[0][1:]]
    blank = [i + 2 for i, c in enumerate(names) if not c]
    if blank or len(set(names)) != len(names):
        raise ValueError(f"{path}: row 1: factor column names must be non-empty and distinct, got {names}")
    out: dict[str, dict[str, float]] = {}
    for r, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue  # a trailing blank line
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}: row {r}: {len(row)} fields, the header has {len(names) + 1}")
        sid = row[0].strip()
        if not sid:
            raise ValueError(f"{path}: row {r}, column subject_id: empty subject id")
        if sid in out:
            raise ValueError(f"{path}: row {r}, column subject_id: subject {sid!r} appears twice")
        values = {}
        for name, cell in zip(names, row[1:]):
            try:
                v = float(cell)
            except ValueError:
                raise ValueError(f"{path}: row {r}, column {name}: {cell!r} is not a number") from None
            if not math.isfinite(v):
                raise ValueError(f"{path}: row {r}, column {name}: {cell!r} is not finite")
            values[name] = v
        out[sid] = values
    if not out:
        raise ValueError(f"{path}: no subject rows")
    return out


def _label_factors(meta: Mapping[str, Any] | None, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(factors the labels read, nuisance factors): from the cohort metadata, else the generator's."""
    if meta is None:
        from fedpanfm.data.synthetic_factors import LABELS, NUISANCE_FACTORS

        return tuple(dict.fromkeys(f for m in LABELS.values() for f in m.weights)), tuple(NUISANCE_FACTORS)
    try:
        nuisance = tuple(meta["factors"]["nuisance"])
        signal = tuple(dict.fromkeys(f for m in meta["labels"].values() for f in m["weights"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a synthetic cohort metadata file with label weights ({exc!r})") from None
    return signal, nuisance


def load_cohort_factors(cohort_dir: Path) -> CohortFactors | None:
    """Latent factors of every subject of a synthetic cohort, or None for a cohort without them.

    Read from each site folder's ``factors.csv`` (:func:`read_factors_csv`); cohorts written
    before those files existed carry the factors in ``cohort_metadata.json`` at the cohort root,
    which is read instead. The factors the labels read and the nuisance factors come from the
    metadata file when there is one, else from the generator (``fedpanfm.data.synthetic_factors``).

    Args:
        cohort_dir: the cohort folder.

    Returns:
        (subject id -> factor -> value, factors the labels read, nuisance factors), or None.

    Raises:
        ValueError: a factors file or the metadata file is ill-formed, only some sites have a
            ``factors.csv``, or a subject id appears in two sites (each names the file).
    """
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / METADATA_NAME
    meta = None
    if path.is_file():
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable metadata file ({exc})") from None
    has_csv = cohort_dir.is_dir() and any((d / FACTORS_NAME).is_file() for d in cohort_dir.iterdir() if d.is_dir())
    if not has_csv:
        if meta is None:
            return None
        try:
            subjects = {s["subject_id"]: {k: float(v) for k, v in s["factors"].items()} for s in meta["subjects"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a synthetic cohort metadata file with subject factors ({exc!r})") from None
        list_sites(cohort_dir)  # the folder must be a cohort, not a stray metadata file
        return (subjects, *_label_factors(meta, path))
    subjects = {}
    for site in list_sites(cohort_dir):
        file = site / FACTORS_NAME
        if not file.is_file():
            raise ValueError(f"{file}: missing, while other sites of {cohort_dir} carry their factors")
        for sid, values in read_factors_csv(file).items():
            if sid in subjects:
                raise ValueError(f"{file}: subject {sid!r} also appears in another site's {FACTORS_NAME}")
            subjects[sid] = values
    return (subjects, *_label_factors(meta, path))


def label_factor_names(factors: CohortFactors) -> list[str]:
    """The factors the labels read, nuisance factors left out (what the oracle and the supervised
    reference use), in the labels' order."""
    _, signal, nuisance = factors
    return [f for f in signal if f not in nuisance]


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


__all__ = [
    "CohortFactors", "FactorReport", "factor_decodability", "label_factor_names", "load_cohort_factors",
    "participation_ratio", "read_factors_csv", "ridge_r2",
]
