"""Baseline rows: what a linear probe reaches without a pre-trained encoder, on the same split.

Our design (docs/evaluation.md, "Baseline rows"). An encoder's probe AUROC means little alone:
on a cohort where organ presence or raw intensities already predict disease, a random encoder
scores well. Every row here is scored with the encoder's protocol (the same subjects, the same
:func:`~fedpanfm.evaluation.probe.probe_split`, features standardised on the probe-train
subjects, the same L2 search) so the rows compare directly:

- ``presence``: the O organ-presence flags alone;
- ``pixel_stats``: per organ, its presence flag and the preprocessed image's mean, std and
  :data:`QUANTILES` (zeros where the organ is absent);
- ``texture_stats``: per organ, its presence flag and statistics of the gradient magnitude of the
  image standardised to zero mean and unit variance, at :data:`TEXTURE_SCALES` (zeros where
  absent): hand-made texture features, what an encoder should at least learn;
- ``pca_pixels``: the first ``evaluation.pca_components`` principal components of every organ's
  preprocessed image concatenated (zero-filled where absent), PCA fitted on the probe-train
  subjects only, plus the presence flags;
- ``oracle``: the true latent factors the labels read (needs the cohort's factors);
- ``random_init``: a randomly initialised encoder of the config's architecture, every readout
  (:mod:`fedpanfm.evaluation.readouts`), seeded apart from the split.

Entry points: :func:`baseline_scores` (each row's :class:`ProbeScores`) and
:func:`baseline_macro_aurocs` (each row's macro AUROC, flat).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.evaluation.embed import Embeddings, embed_batches, random_encoder
from fedpanfm.evaluation.factors import CohortFactors, label_factor_names
from fedpanfm.evaluation.probe import ProbeScores, ProbeSplit, fit_and_score, probe_split
from fedpanfm.evaluation.readouts import READOUTS, readout

#: Pixel-statistics baseline: quantiles of each organ's preprocessed image.
QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)

#: Texture-statistics baseline: the gradient magnitude is read on the image average-pooled by each
#: of these factors along every axis (1 = the image itself).
TEXTURE_SCALES: tuple[int, ...] = (1, 2, 4)

#: Average pooling by the images' rank: (n, 1, H, W) or (n, 1, D, H, W).
_AVG_POOL: dict[int, Callable[..., Tensor]] = {4: torch.nn.functional.avg_pool2d, 5: torch.nn.functional.avg_pool3d}

#: Feature baselines (no encoder) in report order; ``random_init`` follows with every readout.
FEATURE_BASELINES: tuple[str, ...] = ("presence", "pixel_stats", "texture_stats", "pca_pixels", "oracle")


def _cat(batches: Sequence[SubjectBatch], attr: str) -> Tensor:
    return torch.cat([getattr(b, attr).cpu() for b in batches])


def _ids(batches: Sequence[SubjectBatch]) -> list[str]:
    return [s for b in batches for s in b.subject_ids]


def feature_embeddings(batches: Sequence[SubjectBatch], features: Tensor, name: str) -> Embeddings:
    """``features`` (N, F), one row per subject of ``batches`` in batch order, as probe-ready embeddings."""
    if not batches:
        raise ValueError("feature_embeddings: no batches")
    ids = _ids(batches)
    if features.shape[0] != len(ids):
        raise ValueError(f"feature_embeddings: {features.shape[0]} feature rows for {len(ids)} subjects")
    present = _cat(batches, "present")
    return Embeddings(
        subject_ids=ids, cls=features.float(), shares=torch.zeros(present.shape), present=present,
        labels=_cat(batches, "labels"), label_names=batches[0].label_names, organ_names=batches[0].organ_names,
        readout=name,
    )


def presence_features(batches: Sequence[SubjectBatch]) -> Tensor:
    """(N, O) the organ-presence flags as floats."""
    return _cat(batches, "present").float()


def _organ_images(batches: Sequence[SubjectBatch], organ: str) -> tuple[Tensor, Tensor]:
    """(rows of the subjects that have ``organ`` over all batches, their images (n, 1, *grid))."""
    rows, images, offset = [], [], 0
    for b in batches:
        if organ in b.index:
            rows.append(b.index[organ].cpu() + offset)
            images.append(b.images[organ].detach().cpu().float())
        offset += b.size
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(rows), torch.cat(images)


def _organ_blocks(batches: Sequence[SubjectBatch], width: int, features: Callable[[Tensor], Tensor]) -> Tensor:
    """(N, O x ``width``): per organ, a presence flag and ``features`` of its images (n, 1, *grid) ->
    (n, width - 1), in vocabulary order; zeros where the organ is absent."""
    n = len(_ids(batches))
    organs = batches[0].organ_names
    out = torch.zeros(n, len(organs) * width)
    for k, organ in enumerate(organs):
        rows, x = _organ_images(batches, organ)
        if len(rows):
            out[rows, k * width:(k + 1) * width] = torch.cat([torch.ones(len(x), 1), features(x)], dim=1)
    return out


def pixel_stats_features(batches: Sequence[SubjectBatch], quantiles: Sequence[float] = QUANTILES) -> Tensor:
    """(N, O x (3 + Q)) per organ: presence flag, mean, std and ``quantiles`` of its image; zeros where absent."""
    q = torch.tensor(list(quantiles))

    def stats(x: Tensor) -> Tensor:
        x = x.flatten(1)
        return torch.cat([x.mean(1, keepdim=True), x.std(1, unbiased=False, keepdim=True), torch.quantile(x, q, dim=1).T],
                         dim=1)

    return _organ_blocks(batches, 3 + len(q), stats)


def gradient_magnitude(x: Tensor) -> Tensor:
    """(n, 1, *S) images -> (n, 1, *S) magnitude of their forward-difference gradient over every
    spatial axis (the last slice of each axis has no forward neighbour and counts as flat)."""
    square = torch.zeros_like(x)
    for axis in range(2, x.dim()):
        pad = [0, 0] * (x.dim() - 1 - axis) + [0, 1]  # F.pad lists the last axis first
        square = square + torch.nn.functional.pad(torch.diff(x, dim=axis), pad) ** 2
    return square.sqrt()


def texture_stats_features(batches: Sequence[SubjectBatch], scales: Sequence[int] = TEXTURE_SCALES) -> Tensor:
    """(N, O x (1 + 3 x len(scales))) per organ: presence flag, then per scale the log of the mean,
    median and 90th percentile of the gradient magnitude; zeros where absent.

    Each image is first standardised (its own mean and std over its voxels), so intensity gain
    and offset, per scanner or per image, do not enter; what is left is how fast intensity
    changes: texture scale, lesion edges, outline roughness. Why a row of its own: the
    benchmark generator v2 shows disease through exactly these (docs/synthetic-cohort.md) at a
    fixed intensity histogram, which ``pixel_stats`` reads, so this row is the floor a
    pre-trained encoder should clear with features it learned. A scale whose pooled image would
    have fewer than 2 voxels along an axis contributes zeros.
    """
    q = torch.tensor([0.5, 0.9])

    def stats(x: Tensor) -> Tensor:
        flat = x.flatten(1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x = (x - flat.mean(1).view(shape)) / flat.std(1, unbiased=False).clamp(min=1e-6).view(shape)
        per_scale = []
        for s in scales:
            if min(x.shape[2:]) < 2 * s:
                per_scale.append(torch.zeros(len(x), 3))
                continue
            g = gradient_magnitude(x if s == 1 else _AVG_POOL[x.dim()](x, s)).flatten(1)
            # log: texture scale multiplies the gradient (e^{0.45 z} in the generator), so the
            # probe's linear read is on the log.
            per_scale.append(torch.cat([g.mean(1, keepdim=True), torch.quantile(g, q, dim=1).T], 1).clamp(min=1e-6).log())
        return torch.cat(per_scale, dim=1)

    return _organ_blocks(batches, 1 + 3 * len(scales), stats)


def pixel_matrix(batches: Sequence[SubjectBatch], sizes: Mapping[str, int] | None = None) -> Tensor:
    """(N, sum of voxels) every organ's preprocessed image flattened, concatenated in vocabulary
    order, zero-filled where the organ is absent.

    Args:
        batches: the collated subjects.
        sizes: organ -> voxels per image; None = read from the batches (an organ no subject has
            then contributes no column).
    """
    n = len(_ids(batches))
    blocks = []
    for organ in batches[0].organ_names:
        rows, x = _organ_images(batches, organ)
        x = x.flatten(1)
        width = (sizes or {}).get(organ, x.shape[1] if len(rows) else 0)
        block = torch.zeros(n, width)
        if len(rows):
            block[rows] = x
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def pca_pixel_features(batches: Sequence[SubjectBatch], train_ids: Sequence[str], n_components: int = 32) -> Tensor:
    """(N, K + O) the pixels' first K principal components (PCA fitted on ``train_ids`` only) and
    the presence flags; K = min(``n_components``, train subjects, pixel columns).

    scikit-learn's PCA (full SVD: deterministic); scored subjects never shape the components.
    """
    from sklearn.decomposition import PCA

    ids = _ids(batches)
    pos = {s: i for i, s in enumerate(ids)}
    missing = [s for s in train_ids if s not in pos]
    if missing:
        raise KeyError(f"pca_pixel_features: train subject(s) not in the batches: {', '.join(missing[:5])}")
    x = pixel_matrix(batches).double().numpy()
    train = x[[pos[s] for s in train_ids]]
    k = min(n_components, train.shape[0], train.shape[1])
    pca = PCA(n_components=k, svd_solver="full").fit(train)
    comps = torch.from_numpy(pca.transform(x).astype(np.float64)).float()
    return torch.cat([comps, presence_features(batches)], dim=1)


def oracle_features(subject_ids: Sequence[str], factors: CohortFactors) -> Tensor:
    """(N, F) the latent factors the labels read (nuisance factors left out), one row per subject.

    Raises:
        KeyError: a subject has no factors, or lacks one the labels read (names it).
    """
    values = factors[0]
    names = label_factor_names(factors)
    if not names:
        raise ValueError("oracle_features: the labels read no latent factor")
    rows = []
    for s in subject_ids:
        if s not in values:
            raise KeyError(f"oracle_features: no latent factors for subject {s!r}")
        lacking = [f for f in names if f not in values[s]]
        if lacking:
            raise KeyError(f"oracle_features: subject {s!r} lacks factor(s) {lacking}")
        rows.append([values[s][f] for f in names])
    return torch.tensor(rows, dtype=torch.float64).float()


def baseline_scores(
    batches: Sequence[SubjectBatch],
    cfg: ExperimentConfig,
    seed: int,
    factors: CohortFactors | None = None,
    split: ProbeSplit | None = None,
    device: torch.device | str = "cpu",
    random_embeddings: Embeddings | None = None,
) -> dict[str, ProbeScores]:
    """Every baseline row's test scores, probed as the encoders are.

    Args:
        batches: every labelled subject, collated once (``collate_dataset``).
        cfg: the experiment config (``evaluation`` protocol; the architecture of ``random_init``).
        seed: the run seed: the split is :func:`probe_split` at it, the random encoder is
            initialised with it, the bootstrap uses it.
        factors: the cohort's latent factors; None leaves the ``oracle`` row out.
        split: the probe split; None = ``probe_split(subjects, cfg.evaluation, seed)``.
        device: where the random encoder runs.
        random_embeddings: the random encoder's embeddings if already computed.

    Returns:
        row -> :class:`ProbeScores`: ``presence``, ``pixel_stats``, ``texture_stats``, ``pca_pixels``, ``oracle``
        (with factors) and ``random_init:<readout>`` for every readout.
    """
    ev = cfg.evaluation
    split = split or probe_split(_ids(batches), ev, seed)
    out = feature_baseline_scores(batches, cfg, seed, factors, split)
    if random_embeddings is None:
        encoder = random_encoder(cfg, seed).to(device)
        random_embeddings = embed_batches(encoder, batches, device=device)
    for name in READOUTS:
        out[f"random_init:{name}"] = fit_and_score(readout(random_embeddings, name), split, ev, seed)[1]
    return out


def feature_baseline_scores(
    batches: Sequence[SubjectBatch],
    cfg: ExperimentConfig,
    seed: int,
    factors: CohortFactors | None = None,
    split: ProbeSplit | None = None,
) -> dict[str, ProbeScores]:
    """The encoder-free rows of :func:`baseline_scores`: ``presence``, ``pixel_stats``,
    ``texture_stats``, ``pca_pixels`` and (with factors) ``oracle``; arguments as there."""
    ev = cfg.evaluation
    split = split or probe_split(_ids(batches), ev, seed)
    feats: dict[str, Tensor] = {
        "presence": presence_features(batches),
        "pixel_stats": pixel_stats_features(batches),
        "texture_stats": texture_stats_features(batches),
        "pca_pixels": pca_pixel_features(batches, split.train, ev.pca_components),
    }
    if factors is not None:
        feats["oracle"] = oracle_features(_ids(batches), factors)
    return {name: fit_and_score(feature_embeddings(batches, x, name), split, ev, seed)[1] for name, x in feats.items()}


def baseline_macro_aurocs(
    batches: Sequence[SubjectBatch],
    cfg: ExperimentConfig,
    seed: int,
    factors: CohortFactors | None = None,
) -> dict[str, float]:
    """row -> test macro AUROC of every baseline row (:func:`baseline_scores`, no bootstrap).

    For benchmarks of a cohort: e.g. ``baseline_macro_aurocs(collate_dataset(pooled_dataset(dir,
    cfg), cfg), cfg, seed=0, factors=load_cohort_factors(dir))``.
    """
    from dataclasses import replace

    quiet = replace(cfg, evaluation=replace(cfg.evaluation, bootstrap=0))
    return {k: v.macro for k, v in baseline_scores(batches, quiet, seed, factors).items()}


__all__ = [
    "FEATURE_BASELINES",
    "QUANTILES",
    "TEXTURE_SCALES",
    "baseline_macro_aurocs",
    "baseline_scores",
    "feature_baseline_scores",
    "feature_embeddings",
    "gradient_magnitude",
    "oracle_features",
    "pca_pixel_features",
    "pixel_matrix",
    "pixel_stats_features",
    "presence_features",
    "texture_stats_features",
]
