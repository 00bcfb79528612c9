"""Resampling to the exact target spacing, anti-aliasing, the foreground crop, and the synthetic
cohort loading unchanged under canonical orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedpanfm.config import OrganSpec
from fedpanfm.data.foreground import BODY_HU, foreground_box, foreground_mask, threshold
from fedpanfm.data.manifest import read_manifest
from fedpanfm.data.preprocess import preprocess
from fedpanfm.data.readers import load_image
from fedpanfm.data.resampling import resample, target_size
from fedpanfm.data.synthetic import generate_cohort


@pytest.mark.parametrize(
    "shape, spacing, target",
    [
        ((33, 41, 25), (2.0, 2.0, 2.0), [3.0, 3.0, 3.0]),  # 22, 27.3 -> 27, 16.7 -> 17 target voxels
        ((40, 30, 12), (0.7, 0.9, 5.0), [2.5, 2.1, 5.0]),  # anisotropic, one axis kept
        ((9, 11, 7), (3.0, 2.0, 4.0), [1.5, 0.8, 4.0]),  # upsampling
    ],
)
def test_output_spacing_is_exactly_the_target_and_centred(shape, spacing, target):
    # A linear function of position in mm: every resampled value names the point it was taken at.
    weights = np.array([1.0, 10.0, 100.0])
    mm = [np.arange(n) * s for n, s in zip(shape, spacing)]
    image = sum(w * g for w, g in zip(weights, np.meshgrid(*mm, indexing="ij")))
    for antialias in (False, True):
        out = resample(torch.tensor(image, dtype=torch.float32), spacing, target, antialias).numpy()
        size = [int(round(n * s / t)) for n, s, t in zip(shape, spacing, target)]
        assert list(out.shape) == size == target_size(shape, spacing, target)
        # Output voxel j of an axis sits at centre + (j - (m - 1) / 2) * target, exactly.
        pos = [(n - 1) * s / 2 + (np.arange(m) - (m - 1) / 2) * t for n, s, m, t in zip(shape, spacing, size, target)]
        expected = sum(w * g for w, g in zip(weights, np.meshgrid(*pos, indexing="ij")))
        inside = np.ones(out.shape, bool)
        for a, (p, n, s) in enumerate(zip(pos, shape, spacing)):  # points within the input's voxel centres
            ok = (p >= -1e-9) & (p <= (n - 1) * s + 1e-9)
            inside &= ok.reshape([-1 if b == a else 1 for b in range(3)])
        np.testing.assert_allclose(out[inside], expected[inside], rtol=0, atol=2e-3 * weights.max())
        assert inside.mean() > 0.5
    # The old rule (n voxels -> m voxels over the same field of view) would space them n * s / m apart.
    assert any(abs(n * s / m - t) > 1e-3 for n, s, m, t in zip(shape, spacing, size, target)) or shape == (9, 11, 7)


def test_antialiasing_removes_a_pattern_finer_than_the_new_voxel():
    x = np.arange(96.0)  # mm at 1 mm
    fine = np.cos(2 * np.pi * 0.4 * x)[:, None].repeat(4, 1)  # period 2.5 mm; 3 mm voxels cannot hold it
    coarse = np.cos(2 * np.pi * 0.02 * x)[:, None].repeat(4, 1)  # period 50 mm; they can
    at = 47.5 + (np.arange(32) - 15.5) * 3.0  # output voxel centres
    naive = resample(torch.tensor(fine, dtype=torch.float32), (1.0, 1.0), [3.0, 1.0]).numpy()[:, 0]
    # Without the filter the grating folds into a false 15 mm pattern of nearly full amplitude...
    assert np.abs(naive).max() > 0.9 and naive.std() > 0.5
    smooth = resample(torch.tensor(fine, dtype=torch.float32), (1.0, 1.0), [3.0, 1.0], antialias=True).numpy()[:, 0]
    # ... with it the grating is gone (the border voxels see the odd-reflected pad) ...
    assert np.abs(smooth[2:-2]).max() < 0.05 and smooth.std() < 0.07
    kept = resample(torch.tensor(coarse, dtype=torch.float32), (1.0, 1.0), [3.0, 1.0], antialias=True).numpy()[:, 0]
    # ... while anatomy-scale detail passes (Gaussian gain exp(-2 pi^2 sigma^2 f^2) ~ 0.99).
    np.testing.assert_allclose(kept, np.cos(2 * np.pi * 0.02 * at), atol=0.01)


def _body(shape=(40, 40, 30)) -> np.ndarray:
    rng = np.random.default_rng(0)
    ct = rng.normal(-1000.0, 10.0, size=shape).astype(np.float32)  # air
    ct[3:18, 20:38, 5:20] = 40.0  # soft tissue, off centre
    ct[0, 39, 29] = 100.0  # a speck outside the body
    return ct


def test_foreground_box_is_the_body_plus_margin_without_specks():
    ct = _body()
    mask = foreground_mask(ct, "CT")
    assert threshold(ct, "CT") == BODY_HU and mask.sum() == 15 * 18 * 15  # the speck is dropped
    assert foreground_box(mask, (2.0, 2.0, 2.0), 4.0) == (slice(1, 20), slice(18, 40), slice(3, 22))
    assert foreground_box(mask, (2.0, 2.0, 2.0), 100.0) == (slice(0, 40), slice(0, 40), slice(0, 30))
    assert foreground_box(np.zeros((3, 4), bool), (1.0, 1.0), 5.0) == (slice(0, 3), slice(0, 4))
    # MR / unknown modality: FSL BET's robust threshold p2 + 0.1 (p98 - p2).
    mr = np.concatenate([np.zeros(90), np.full(10, 200.0)])
    assert threshold(mr, "MR") == pytest.approx(20.0)


def test_foreground_crop_puts_the_body_in_the_grid():
    ct = _body()
    spec = OrganSpec(grid=[19, 22, 19], patch=[1, 1, 1], normalize="window", window=[-160.0, 240.0],
                     foreground_crop=True, foreground_margin=4.0)
    out = preprocess(ct, (2.0, 2.0, 2.0), spec, "liver", "f", "CT")[0]
    expected = (np.clip(ct[1:20, 18:40, 3:22], -160, 240) + 160) / 400
    np.testing.assert_allclose(out, expected, atol=1e-6)
    centre = preprocess(ct, (2.0, 2.0, 2.0), OrganSpec(grid=[19, 22, 19], patch=[1, 1, 1], normalize="window"),
                        "liver", "f", "CT")[0]
    assert (centre > 0.3).sum() < 0.8 * (out > 0.3).sum()  # without the crop the grid cuts the body


def test_synthetic_cohort_loads_to_the_arrays_it_wrote(tmp_path):
    cfg = tiny_config(["synth.sites=2", "synth.subjects=2"])
    for site in generate_cohort(tmp_path, cfg):
        for row in read_manifest(site, cfg.data.organ_set()).rows:
            path = Path(site) / row.path
            image = load_image(path)
            written = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32)).squeeze()
            assert image.orientation == "RAS"  # the generator's diagonal affine is already canonical
            np.testing.assert_array_equal(image.array, written)
