"""Baseline rows and readouts: features by hand, and the rows' AUROC against scikit-learn."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_batch, tiny_config
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from fedpanfm.data.batch import SubjectBatch
from fedpanfm.evaluation.baselines import (
    QUANTILES,
    TEXTURE_SCALES,
    baseline_macro_aurocs,
    feature_baseline_scores,
    gradient_magnitude,
    pixel_matrix,
    pixel_stats_features,
    texture_stats_features,
)
from fedpanfm.evaluation.embed import Embeddings, collate_dataset, embed_batches, organ_token_means, random_encoder
from fedpanfm.evaluation.probe import probe_split
from fedpanfm.evaluation.readouts import readout

CFG = tiny_config(["evaluation.bootstrap=0"])
ORGANS = CFG.data.organ_set().names


def _cohort(n: int, seed: int, label_of=None) -> list[SubjectBatch]:
    """n subjects in batches of 50, every organ present with probability 0.7 independently of the
    labels; labels by ``label_of(batch) -> (B, 2)`` (default: coin flips)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 50):
        m = min(50, n - start)
        present = torch.rand(m, len(ORGANS), generator=g) < 0.7
        present[:, 0] = True  # every subject keeps an organ
        sets = [[o for k, o in enumerate(ORGANS) if present[b, k]] for b in range(m)]
        b = make_batch(CFG, sets, seed=seed * 1000 + start)
        b.subject_ids = [f"x{start + i:04d}" for i in range(m)]
        if label_of is not None:
            b.labels = label_of(b)
        out.append(b)
    return out


def test_pixel_stats_by_hand() -> None:
    b = make_batch(CFG, [["brain", "heart"], ["heart"]])
    f = pixel_stats_features([b])
    width = 3 + len(QUANTILES)
    brain, heart = ORGANS.index("brain"), ORGANS.index("heart")
    x = b.images["heart"][1].flatten()
    row = f[1, heart * width:(heart + 1) * width]
    assert row[0] == 1.0 and row[1] == pytest.approx(float(x.mean()), abs=1e-6)
    assert row[2] == pytest.approx(float(x.std(unbiased=False)), abs=1e-6)
    assert row[3:].tolist() == pytest.approx(np.quantile(x.numpy(), QUANTILES).tolist(), abs=1e-5)
    assert torch.all(f[1, brain * width:(brain + 1) * width] == 0)  # absent: zeros, flag 0
    m = pixel_matrix([b])
    assert m.shape == (2, b.images["brain"][0].numel() + b.images["heart"][0].numel())
    assert torch.all(m[1, : b.images["brain"][0].numel()] == 0)


def test_texture_stats_by_hand() -> None:
    b = make_batch(CFG, [["brain", "heart"], ["heart"]])
    grid = tuple(b.images["heart"].shape[2:])
    ramp = torch.arange(grid[-1], dtype=torch.float32).expand(grid)  # rises by 1 along the last axis
    b.images["heart"] = torch.stack([ramp, 3.0 * ramp + 7.0])[:, None]  # the second: gain and offset
    f = texture_stats_features([b])
    width = 1 + 3 * len(TEXTURE_SCALES)
    heart, brain = ORGANS.index("heart"), ORGANS.index("brain")
    row = f[:, heart * width:(heart + 1) * width]
    assert row[:, 0].tolist() == [1.0, 1.0]
    assert torch.allclose(row[0], row[1], atol=1e-5)  # standardised first: gain and offset do not enter
    # By hand at scale 1: after standardising, each step along the last axis is 1 / std of 0..W-1;
    # the last column has no forward neighbour (0), so the mean is (W-1)/W of that, median and 90 % the step.
    w = grid[-1]
    step = 1.0 / float(np.arange(w).std())
    assert row[0, 1:4].tolist() == pytest.approx([math.log(step * (w - 1) / w), math.log(step), math.log(step)], abs=1e-5)
    assert torch.all(f[1, brain * width:(brain + 1) * width] == 0)  # absent: zeros, flag 0
    # Texture scale: white noise changes faster than the same noise smoothed.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, *grid, generator=g)
    b.images["heart"] = torch.cat([noise[:1], torch.nn.functional.avg_pool2d(noise[1:], 3, 1, 1)])
    rough, smooth = texture_stats_features([b])[:, heart * width + 1]
    assert rough > smooth + 0.5


def test_texture_stats_in_3d_and_scales_that_do_not_fit() -> None:
    b = make_batch(CFG, [["heart"], ["heart"]])
    vol = torch.zeros(2, 1, 4, 8, 8)
    vol[:, 0] += torch.arange(4.0)[:, None, None]  # a ramp along the first axis
    b3 = replace(b, images={"heart": vol}, index={"heart": torch.tensor([0, 1])})
    f = texture_stats_features([b3], scales=(1, 2, 4))
    heart = ORGANS.index("heart")
    row = f[0, heart * 10:(heart + 1) * 10]
    step = 1.0 / float(np.arange(4).std())
    assert row[1:4].tolist() == pytest.approx([math.log(step * 3 / 4), math.log(step), math.log(step)], abs=1e-5)
    assert torch.all(row[4:7] != 0)  # scale 2: 2 x 4 x 4 voxels
    assert torch.all(row[7:] == 0)  # scale 4 would leave 1 voxel along the first axis: zeros
    mag = gradient_magnitude(vol)
    assert torch.allclose(mag[:, :, :3], torch.ones(2, 1, 3, 8, 8)) and torch.all(mag[:, :, 3] == 0)


def test_presence_row_is_chance_when_presence_is_independent_of_labels() -> None:
    batches = _cohort(600, seed=1)
    rows = feature_baseline_scores(batches, CFG, seed=0)
    assert abs(rows["presence"].macro - 0.5) < 0.07
    assert "oracle" not in rows  # no factors, no oracle row


def test_oracle_row_reads_the_factors_that_define_the_labels() -> None:
    batches = _cohort(600, seed=2)
    ids = [s for b in batches for s in b.subject_ids]
    rng = np.random.default_rng(0)
    values = {s: {"renal": float(rng.standard_normal()), "neuro": float(rng.standard_normal()),
                  "body_size": float(rng.standard_normal())} for s in ids}
    for b in batches:  # labels: noisy thresholds of the signal factors; body size is nuisance
        r = torch.tensor([[values[s]["renal"], values[s]["neuro"]] for s in b.subject_ids])
        b.labels = (r + 0.3 * torch.randn(r.shape) > 0.5).float()
    rows = feature_baseline_scores(batches, CFG, seed=0, factors=(values, ("renal", "neuro"), ("body_size",)))
    assert rows["oracle"].macro > 0.9
    assert abs(rows["pixel_stats"].macro - 0.5) < 0.1  # the images are noise here


def test_pca_pixels_matches_sklearn() -> None:
    """PCA on the probe-train subjects + presence flags, standardised, L2 logistic regression:
    an independent scikit-learn pipeline at the probe's chosen L2 gets the same test AUROC."""
    g = torch.Generator().manual_seed(5)
    patterns = {o: torch.randn(3, *b_.shape[1:], generator=g) for o, b_ in make_batch(CFG, [list(ORGANS)]).images.items()}

    def label_of(b: SubjectBatch) -> torch.Tensor:
        # Images = 3 subject latents x fixed per-organ patterns + noise: the signal lies in the
        # pixels' leading principal components; labels read the latents.
        z = torch.randn(b.size, 3, generator=g)
        for o, idx in b.index.items():
            b.images[o] = torch.einsum("nk,k...->n...", z[idx], patterns[o]) + 0.5 * b.images[o]
        return torch.stack([(z[:, 0] > 0).float(), (z[:, 1] - z[:, 2] + torch.randn(b.size, generator=g) > 0.5).float()], 1)

    batches = _cohort(400, seed=3, label_of=label_of)
    ids = [s for b in batches for s in b.subject_ids]
    split = probe_split(ids, CFG.evaluation, seed=0)
    rows = feature_baseline_scores(batches, CFG, seed=0, split=split)
    ours = rows["pca_pixels"]

    from fedpanfm.evaluation.baselines import feature_embeddings, pca_pixel_features
    from fedpanfm.evaluation.probe import fit_probes

    pos = {s: i for i, s in enumerate(ids)}
    x = pixel_matrix(batches).numpy().astype(np.float64)
    present = torch.cat([b.present for b in batches]).numpy().astype(np.float64)
    labels = torch.cat([b.labels for b in batches]).numpy()
    tr, te = [pos[s] for s in split.train], [pos[s] for s in split.test]
    pca = PCA(n_components=CFG.evaluation.pca_components, svd_solver="full").fit(x[tr])
    feats = np.concatenate([pca.transform(x), present], axis=1)
    scaler = StandardScaler().fit(feats[tr])
    z = scaler.transform(feats)
    probes = fit_probes(*(feature_embeddings(batches, pca_pixel_features(batches, split.train), "pca_pixels").subset(p)
                          for p in (split.train, split.val)), CFG.evaluation)
    for j, score in enumerate(ours.labels):
        y = labels[:, j]
        l2 = probes.probes[score.label].l2
        pw = float((y[tr] == 0).sum() / (y[tr] == 1).sum())
        clf = LogisticRegression(C=1.0 / (l2 * len(tr)), class_weight={0: 1.0, 1: pw}, max_iter=10000, tol=1e-10)
        clf.fit(z[tr], y[tr])
        ref = roc_auc_score(y[te], clf.decision_function(z[te]))
        assert score.auroc == pytest.approx(ref, abs=2e-3), score.label
    assert ours.labels[0].auroc > 0.8  # the first label is linear in the pixels


def test_organ_mean_readout_by_hand() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    organ_id = torch.tensor([[-1, 0, 0, 2, -1], [-1, 1, 1, 1, 1]])
    pad = torch.tensor([[False, False, False, False, True], [False] * 5])
    m = organ_token_means(tokens, organ_id, pad, 3)
    assert torch.equal(m[0, 0], (tokens[0, 1] + tokens[0, 2]) / 2)
    assert torch.equal(m[0, 1], torch.zeros(3)) and torch.equal(m[0, 2], tokens[0, 3])
    assert torch.equal(m[1, 1], tokens[1, 1:].mean(0))
    present = torch.tensor([[True, False, True], [False, True, False]])
    emb = Embeddings(["a", "b"], torch.ones(2, 4), torch.zeros(2, 3), present, torch.zeros(2, 0), (), ("p", "q", "r"),
                     organ_mean=m)
    om = readout(emb, "organ_mean")
    assert om.cls.shape == (2, 3 * 3 + 3) and om.readout == "organ_mean"
    assert torch.equal(om.cls[:, -3:], present.float()) and torch.equal(om.cls[0, :3], m[0, 0])
    both = readout(emb, "both")
    assert torch.equal(both.cls, torch.cat([emb.cls, om.cls], 1))
    with pytest.raises(ValueError, match="already hold"):
        readout(om, "both")
    with pytest.raises(ValueError, match="unknown readout"):
        readout(emb, "mean")


def test_encoder_readouts_and_every_row_on_a_generated_cohort(tmp_path) -> None:
    from fedpanfm.data.dataset import pooled_dataset
    from fedpanfm.data.synthetic import generate_cohort
    from fedpanfm.evaluation.factors import load_cohort_factors

    cfg = tiny_config(["synth.sites=2", "synth.subjects=30", "evaluation.bootstrap=0"])
    generate_cohort(tmp_path / "c", cfg)
    batches = collate_dataset(pooled_dataset(tmp_path / "c", cfg), cfg)
    emb = embed_batches(random_encoder(cfg, 0), batches)
    n, d = len(emb), cfg.model.dim
    assert emb.organ_mean.shape == (n, len(ORGANS), d)
    # an absent organ's mean is zero; a present one's is not
    assert torch.all(emb.organ_mean[~emb.present] == 0) and torch.all(emb.organ_mean[emb.present].abs().sum(-1) > 0)
    assert readout(emb, "both").cls.shape == (n, d + len(ORGANS) * d + len(ORGANS))
    rows = baseline_macro_aurocs(batches, cfg, seed=0, factors=load_cohort_factors(tmp_path / "c"))
    assert set(rows) == {"presence", "pixel_stats", "texture_stats", "pca_pixels", "oracle",
                         "random_init:cls", "random_init:organ_mean", "random_init:both"}
    assert all(0.0 <= v <= 1.0 for v in rows.values() if not math.isnan(v))
