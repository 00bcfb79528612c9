"""fedpanfm's preprocessing against a MONAI pipeline on the same real files.

MONAI pipeline: LoadImage (NibabelReader / PydicomReader) -> EnsureChannelFirst ->
Orientation("RAS") -> GaussianSmooth(sigma = (t / s - 1) / 2) -> Spacing(t, bilinear, border)
-> ScaleIntensityRange(clip=True) for CT, NormalizeIntensity over the foreground for MR;
CropForeground for the body crop.

Stated tolerance: every voxel at least one output voxel away from the faces agrees to 1e-5 of
the intensity range (float32 rounding). The outer shell may differ by more, and only there,
because MONAI's GaussianSmooth pads with zeros where we reflect (docs/data.md, "Resampling").
The spacings are chosen where MONAI's grid (first voxel kept) and ours (centred) coincide, i.e.
(n - 1) s / t is whole and round(n s / t) voxels; elsewhere the two differ by a sub-voxel shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from nibabel.testing import data_path

pytest.importorskip("monai")
from monai.transforms import (  # noqa: E402
    Compose,
    CropForeground,
    EnsureChannelFirst,
    GaussianSmooth,
    LoadImage,
    NormalizeIntensity,
    Orientation,
    ScaleIntensityRange,
    Spacing,
)

from fedpanfm.config import OrganSpec  # noqa: E402
from fedpanfm.data.foreground import foreground_box, foreground_mask  # noqa: E402
from fedpanfm.data.intensity import normalize  # noqa: E402
from fedpanfm.data.preprocess import preprocess  # noqa: E402
from fedpanfm.data.readers import load_image  # noqa: E402

ANAT = Path(data_path) / "anatomical.nii"  # LAS, 2 mm
EX4D = Path(data_path) / "example4d.nii.gz"
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def _monai(path: Path, reader: str, spacing: tuple[float, ...], sigmas: list[float], tail: list | None = None):
    steps = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(), Orientation("RAS")]
    if any(s > 0 for s in sigmas):
        steps.append(GaussianSmooth(sigma=sigmas))
    steps.append(Spacing(pixdim=spacing, mode="bilinear", padding_mode="border"))
    return Compose(steps + (tail or []))(str(path))[0].numpy()


def _ours(path: Path, spacing: tuple[float, ...], grid, modality: str = "", **spec) -> np.ndarray:
    image = load_image(path)
    organ = OrganSpec(grid=list(grid), patch=[1] * len(grid), spacing=list(spacing), **spec)
    return preprocess(image.array, image.spacing, organ, "brain", str(path), modality)[0]


@pytest.mark.parametrize("target", [3.2, 8.0 / 3.0])
def test_nifti_orientation_antialiasing_and_spacing_match_monai(target):
    sigma = (target / 2.0 - 1.0) / 2.0
    ref = _monai(ANAT, "NibabelReader", (target,) * 3, [sigma] * 3)
    ours = _ours(ANAT, (target,) * 3, ref.shape, normalize="none")
    assert ours.shape == ref.shape  # same voxel count per axis, so the same grid
    tol = 1e-5 * (ref.max() - ref.min())
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], ref[1:-1, 1:-1, 1:-1], rtol=0, atol=tol)
    # Without anti-aliasing there is no padding to differ in: equal everywhere.
    plain = _monai(ANAT, "NibabelReader", (target,) * 3, [0.0] * 3)
    np.testing.assert_allclose(_ours(ANAT, (target,) * 3, plain.shape, normalize="none", antialias=False),
                               plain, rtol=0, atol=tol)


def test_ct_dicom_series_with_hu_window_matches_monai():
    raw = Orientation("RAS")(EnsureChannelFirst()(LoadImage(reader="PydicomReader", image_only=True)(str(CT5N))))
    np.testing.assert_array_equal(load_image(CT5N).array, raw[0].numpy())  # LPS -> RAS, rescale: identical
    t = 0.488281 * 1.5  # 16 voxels -> 11, grids coincide
    window = ScaleIntensityRange(a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)
    ref = _monai(CT5N, "PydicomReader", (t, t, 2.5), [0.25, 0.25, 0.0], [window])
    ours = _ours(CT5N, (t, t, 2.5), ref.shape, "CT", window=[-160.0, 240.0])  # normalize auto -> window
    assert ours.shape == ref.shape == (11, 11, 5)
    np.testing.assert_allclose(ours[1:-1, 1:-1], ref[1:-1, 1:-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=0.02)  # the shell: zero padding in MONAI


def test_mr_foreground_zscore_matches_monai_normalize_intensity():
    resampled = _ours(ANAT, (3.2,) * 3, (21, 26, 16), normalize="none")
    p2, p98 = np.percentile(resampled, [2, 98])
    mask = resampled > p2 + 0.1 * (p98 - p2)  # FSL BET's threshold, written out independently
    np.testing.assert_array_equal(foreground_mask(resampled, "MR"), mask)
    ref = NormalizeIntensity(nonzero=True)(torch.from_numpy(resampled * mask)[None])[0].numpy()
    ours = normalize(torch.from_numpy(resampled), "foreground_zscore", [], None, torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-5)
    full = _ours(ANAT, (3.2,) * 3, (21, 26, 16), "MR")  # the whole pipeline with normalize = auto
    np.testing.assert_allclose(full, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("margin_mm", [0.0, 4.0, 10.0])
def test_foreground_crop_matches_monai_crop_foreground(margin_mm):
    image = load_image(EX4D, frame=0)  # an EPI volume with air around the head
    p2, p98 = np.percentile(image.array, [2, 98])
    voxels = [int(np.ceil(margin_mm / s - 1e-9)) for s in image.spacing]
    crop = CropForeground(select_fn=lambda x: x > p2 + 0.1 * (p98 - p2), margin=voxels, allow_smaller=True)
    ref = crop(torch.from_numpy(image.array)[None])[0].numpy()
    ours = image.array[foreground_box(foreground_mask(image.array, "MR"), image.spacing, margin_mm)]
    assert ref.shape[0] < image.array.shape[0]  # something is cropped
    np.testing.assert_array_equal(ours, ref)
