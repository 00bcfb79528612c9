"""``python -m bench.cohort_acceptance``: the benchmark generator's acceptance figures (issue 14).

Writes an evaluation-style cohort with the study config (2 full-body sites x 600 subjects, organ
presence independent of disease) and prints the macro AUROC of every baseline row with the
project's probes (split and L2 as every study arm) at 3 probe seeds, and, independently of the
project's probe code, of presence, per-organ pixel statistics, per-organ texture statistics (its own
numpy version), PCA-32 of the pixels + presence and the oracle with scikit-learn's 5-fold
cross-validated ``LogisticRegressionCV``. ``--supervised DIR`` also trains the supervised reference on the training cohort DIR (>= 768 subjects) and probes
it; ``--set evaluation.study.supervised_epochs=N`` gives it N epochs (the study's 30 by default).
The targets are in docs/synthetic-cohort.md ("Acceptance figures").
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from fedpanfm.cli import add_config_args
from fedpanfm.config import ExperimentConfig, load_config
from fedpanfm.data.dataset import pooled_dataset
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.evaluation import baseline_macro_aurocs, collate_dataset, embed_batches, fit_and_score
from fedpanfm.evaluation.baselines import TEXTURE_SCALES
from fedpanfm.evaluation.factors import load_cohort_factors
from fedpanfm.evaluation.probe import probe_split
from fedpanfm.evaluation.readouts import READOUTS, readout

EVAL_SETTINGS = [
    "synth.sites=2", "synth.subjects=600", "synth.seed=1000", "synth.presence=independent",
    "synth.site_organs=[[brain,heart,adipose,liver,kidney,spleen,pancreas],"
    "[brain,heart,adipose,liver,kidney,spleen,pancreas]]",
]


def texture_block(images: np.ndarray, scales: tuple[int, ...]) -> np.ndarray:
    """Independent numpy version of the ``texture_stats`` row for one organ: (n, *grid) images ->
    (n, 3 x len(scales)) log mean / median / 90th percentile of the forward-difference gradient
    magnitude of each standardised image, average-pooled by each scale (zeros where one does not fit)."""
    n, grid = images.shape[0], images.shape[1:]
    flat = images.reshape(n, -1).astype(np.float64)
    z = ((flat - flat.mean(1, keepdims=True)) / np.maximum(flat.std(1, keepdims=True), 1e-6)).reshape(images.shape)
    out = []
    for s in scales:
        if min(grid) < 2 * s:
            out.append(np.zeros((n, 3)))
            continue
        cut = tuple(slice(0, (g // s) * s) for g in grid)
        pooled = z[(slice(None), *cut)].reshape(n, *[v for g in grid for v in (g // s, s)])
        pooled = pooled.mean(axis=tuple(range(2, 2 + 2 * len(grid), 2)))
        square = np.zeros_like(pooled)
        for axis in range(1, pooled.ndim):
            d = np.diff(pooled, axis=axis)
            square += np.concatenate([d, np.zeros_like(np.take(d, [0], axis=axis))], axis=axis) ** 2
        g = np.sqrt(square).reshape(n, -1)
        stats = np.stack([g.mean(1), np.quantile(g, 0.5, axis=1), np.quantile(g, 0.9, axis=1)], 1)
        out.append(np.log(np.maximum(stats, 1e-6)))
    return np.concatenate(out, 1)


def sklearn_rows(batches: list, factors: tuple, label_names: tuple[str, ...]) -> dict[str, float]:
    """Independent check: 5-fold cross-validated logistic probes (scikit-learn) on the simple rows."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ids = [s for b in batches for s in b.subject_ids]
    present = np.concatenate([b.present.numpy() for b in batches]).astype(float)
    labels = np.concatenate([b.labels.numpy() for b in batches])
    organs = batches[0].organ_names
    pixels, stats, textures = [], [], []
    for k, organ in enumerate(organs):
        shape = next(b.images[organ].shape[1:] for b in batches if organ in b.images)
        block = np.zeros((len(ids), int(np.prod(shape))), dtype=np.float32)
        row = 0
        for b in batches:
            if organ in b.images:
                block[row + b.index[organ].numpy()] = b.images[organ].reshape(len(b.index[organ]), -1).numpy()
            row += b.size
        pixels.append(block)
        q = np.quantile(block, [0.05, 0.25, 0.5, 0.75, 0.95], axis=1).T
        stats.append(np.concatenate([block.mean(1, keepdims=True), block.std(1, keepdims=True), q], 1) * present[:, [k]])
        textures.append(texture_block(block.reshape(len(ids), *shape[1:]), TEXTURE_SCALES) * present[:, [k]])
    subject_factors, signal, _ = factors
    inputs = {
        "presence": present,
        "pixel_stats": np.concatenate(stats + [present], 1),
        "texture_stats": np.concatenate(textures + [present], 1),
        "pca_pixels": np.concatenate([PCA(32, random_state=0).fit_transform(np.concatenate(pixels, 1)), present], 1),
        "oracle": np.array([[subject_factors[s][f] for f in signal] for s in ids]),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, x in inputs.items():
            aucs = []
            for j in range(len(label_names)):
                known = ~np.isnan(labels[:, j])
                y = labels[known, j].astype(int)
                clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 3, 8), max_iter=3000))
                p = cross_val_predict(clf, x[known], y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                      method="predict_proba")[:, 1]
                aucs.append(roc_auc_score(y, p))
            out[name] = float(np.mean(aucs))
    return out


def supervised_row(cfg: ExperimentConfig, train_cohort: Path, batches: list, seeds: list[int]) -> dict[str, float]:
    """The supervised reference trained on ``train_cohort``, probed as every arm (mean over seeds)."""
    from fedpanfm.evaluation.study import plan_budget, site_train_counts
    from fedpanfm.evaluation.supervised_reference import train_factor_encoder

    plan = plan_budget(cfg, site_train_counts(train_cohort, cfg))["supervised_factors"]  # the study's own
    encoder = train_factor_encoder(cfg, train_cohort, plan.steps, seed=0)
    emb = embed_batches(encoder, batches)
    scores: dict[str, list[float]] = {r: [] for r in READOUTS}
    for seed in seeds:
        split = probe_split(emb.subject_ids, cfg.evaluation, seed)
        for r in READOUTS:
            scores[r].append(fit_and_score(readout(emb, r), split, cfg.evaluation, seed)[1].macro)
    print(f"supervised reference: {plan.subjects} training subjects, {plan.steps} steps ({plan.epochs} epochs)")
    return {f"supervised:{r}": float(np.mean(v)) for r, v in scores.items()}


def acceptance_configs(path: str, overrides: list[str]) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The config the encoders and probes use, and the one the evaluation cohort is written with
    (the same overrides, then the evaluation-cohort settings, which win)."""
    return load_config(path, overrides), load_config(path, overrides + EVAL_SETTINGS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cohort_acceptance", description=__doc__.splitlines()[0])
    add_config_args(p)
    p.set_defaults(config="configs/study.yaml")
    p.add_argument("--cohort", default="", help="an existing evaluation cohort (default: write one to a temp folder)")
    p.add_argument("--supervised", default="", help="training cohort for the supervised reference (optional)")
    a = p.parse_args(argv)
    cfg, eval_cfg = acceptance_configs(a.config, a.overrides)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(a.cohort) if a.cohort else Path(tmp) / "eval"
        if not a.cohort:
            generate_cohort(cohort, eval_cfg)
        batches = collate_dataset(pooled_dataset(cohort, cfg), cfg)
        factors = load_cohort_factors(cohort)
        if factors is None:
            raise SystemExit(f"{cohort}: no factors.csv: not a synthetic cohort")
        seeds = [0, 1, 2]
        rows: dict[str, list[float]] = {}
        for seed in seeds:
            for k, auroc in baseline_macro_aurocs(batches, cfg, seed=seed, factors=factors).items():
                rows.setdefault(k, []).append(auroc)
        print(f"{'row':28s} {'project probes (3 seeds)':28s} sklearn 5-fold CV")
        independent = sklearn_rows(batches, factors, batches[0].label_names)
        for k, v in rows.items():
            ind = independent.get(k)
            print(f"{k:28s} {np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})      {'' if ind is None else f'{ind:.3f}'}")
        if a.supervised:
            for k, mean in supervised_row(cfg, Path(a.supervised), batches, seeds).items():
                print(f"{k:28s} {mean:.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
