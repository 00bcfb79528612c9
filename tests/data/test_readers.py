"""Readers on files no one here wrote (nibabel's and pydicom's shipped test data), end to end
through manifest -> SiteDataset -> collate, plus the squeeze / npy-spacing rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from conftest import tiny_config

from fedpanfm.data.collate import make_loader
from fedpanfm.data.dataset import SiteDataset
from fedpanfm.data.manifest import CohortError, ManifestRow, write_manifest
from fedpanfm.data.readers import probe_image, read_image

NIB_DATA = Path(nibabel.__file__).parent / "tests" / "data"
DCM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
CT5N = DCM_DATA / "dicomdirtests" / "98892001" / "CT5N"  # 5 axial CT slices, 2.5 mm apart


def test_nifti_shape_and_spacing_from_the_header():
    arr, spacing = read_image(NIB_DATA / "anatomical.nii")
    assert arr.shape == (33, 41, 25) and arr.dtype == np.float32
    assert spacing == (2.0, 2.0, 2.0)
    arr, spacing = read_image(NIB_DATA / "standard.nii.gz")
    assert arr.shape == (4, 5, 7) and spacing == (1.0, 3.0, 2.0)
    assert probe_image(NIB_DATA / "standard.nii.gz").shape == (4, 5, 7)
    # 4D stays 4D: a time axis is not a singleton.
    assert probe_image(NIB_DATA / "example4d.nii.gz").shape == (128, 96, 24, 2)


def test_single_file_dicom_is_2d_with_rescale_applied():
    arr, spacing = read_image(DCM_DATA / "CT_small.dcm")
    ds = pydicom.dcmread(DCM_DATA / "CT_small.dcm")
    assert arr.shape == (128, 128) and spacing == pytest.approx((0.661468, 0.661468))
    # CT_small has slope 1, intercept -1024: values are Hounsfield units. It is an axial slice
    # (columns toward L, rows toward P): canonical RAS puts reversed columns first, then reversed rows.
    np.testing.assert_array_equal(arr, (ds.pixel_array.astype(np.float32) - 1024.0)[::-1, ::-1].T)


def test_dicom_series_sorted_by_position_with_slice_distance(tmp_path):
    series = tmp_path / "ct"
    series.mkdir()
    # Rename so that file-name order is the reverse of the true slice order.
    names = sorted(p.name for p in CT5N.iterdir())
    for i, name in enumerate(names):
        shutil.copy(CT5N / name, series / f"slice{len(names) - i:02d}")
    arr, spacing = read_image(series)
    assert arr.shape == (16, 16, 5)  # canonical RAS: x (R), y (A), z (S, the slice axis)
    assert spacing == pytest.approx((0.488281, 0.488281, 2.5))
    # Positions z = 8.76 (file 2062) down to -1.24 (file 3353): ascending z puts 3353 first.
    expected_order = ["3353", "3023", "2693", "2392", "2062"]
    for k, name in enumerate(expected_order):
        ds = pydicom.dcmread(CT5N / name)
        np.testing.assert_array_equal(arr[:, :, k], (ds.pixel_array.astype(np.float32) * 1.0 - 1024.0)[::-1, ::-1].T)
    assert probe_image(series).shape == (16, 16, 5)


@pytest.mark.parametrize(
    "folder, match",
    [
        ("98892003/MR700", "ImageOrientationPatient differs"),  # radial slices, not a stack
        ("98892003/MR2", "SeriesInstanceUID differs"),  # localizer slices of several series
        ("77654033/CT2", "uneven DICOM slice gaps"),  # 4 slices out of a longer series
    ],
)
def test_dicom_folders_that_are_not_one_regular_series_are_refused(folder, match):
    with pytest.raises(CohortError, match=match):
        probe_image(DCM_DATA / "dicomdirtests" / folder)


def test_singleton_axes_squeezed_and_npy_spacing(tmp_path):
    img = nibabel.Nifti1Image(np.arange(12, dtype=np.float32).reshape(3, 4, 1), np.diag([0.5, 0.7, 3.0, 1.0]))
    nibabel.save(img, tmp_path / "slice.nii.gz")
    arr, spacing = read_image(tmp_path / "slice.nii.gz")
    assert arr.shape == (3, 4) and spacing == pytest.approx((0.5, 0.7))
    np.save(tmp_path / "a.npy", np.ones((2, 5, 1), dtype=np.int16))
    arr, spacing = read_image(tmp_path / "a.npy")
    assert arr.shape == (2, 5) and arr.dtype == np.float32 and spacing == (1.0, 1.0)
    assert read_image(tmp_path / "a.npy", (2.0, 3.0, 9.0))[1] == (2.0, 3.0)
    assert read_image(tmp_path / "a.npy", (2.0, 3.0))[1] == (2.0, 3.0)  # spacing of the squeezed image
    with pytest.raises(CohortError, match=r"a.npy: spacing .* 4 values"):
        read_image(tmp_path / "a.npy", (1.0, 1.0, 1.0, 1.0))


def _site(tmp_path: Path, files: dict[str, tuple[str, Path]]) -> Path:
    """A one-organ site whose subjects are copies of the given real files."""
    site = tmp_path / "real_site"
    site.mkdir()
    rows = []
    for sid, (organ, src) in files.items():
        dst = site / "img" / f"{sid}{''.join(src.suffixes) if src.is_file() else ''}"
        dst.parent.mkdir(exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        rows.append(ManifestRow(sid, organ, str(dst.relative_to(site)), {"dx": float(len(rows) % 2)}))
    write_manifest(site, rows, ["dx"])
    return site


def test_real_nifti_through_dataset_and_collate(tmp_path):
    cfg = tiny_config()  # brain grid (8, 8, 8), z-score, file spacing kept
    site = _site(tmp_path, {"anat": ("brain", NIB_DATA / "anatomical.nii"),
                            "std": ("brain", NIB_DATA / "standard.nii.gz"),
                            "ct": ("brain", CT5N)})
    ds = SiteDataset(site, cfg)
    batch = next(iter(make_loader(ds, cfg, shuffle=False)))
    assert batch.subject_ids == ["anat", "std", "ct"]
    assert batch.images["brain"].shape == (3, 1, 8, 8, 8)
    assert batch.index["brain"].tolist() == [0, 1, 2]
    assert batch.present[:, 0].all() and not batch.present[:, 1:].any()
    assert batch.labels.flatten().tolist() == [0.0, 1.0, 0.0]
    # Independent result for anatomical.nii: z-score over the whole image, then the centre crop
    # (33, 41, 25) -> (8, 8, 8) starts at ((33-8)//2, (41-8)//2, (25-8)//2) = (12, 16, 8).
    # The file is LAS: canonical RAS reverses its first axis.
    raw = np.asarray(nibabel.load(NIB_DATA / "anatomical.nii").get_fdata(), dtype=np.float64)[::-1]
    z = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(batch.images["brain"][0, 0].numpy(), z[12:20, 16:24, 8:16], rtol=1e-4, atol=1e-4)
    # standard.nii.gz (4, 5, 7) is padded on every axis with the z-scored minimum.
    std = batch.images["brain"][1, 0]
    raw = np.asarray(nibabel.load(NIB_DATA / "standard.nii.gz").get_fdata(), dtype=np.float64)
    z = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(std[2:6, 1:6, 0:7].numpy(), z, rtol=1e-4, atol=1e-5)
    assert torch.all(std[0:2] == float(z.min()))


def test_real_dicom_files_as_a_2d_organ(tmp_path):
    cfg = tiny_config(["data.organs.heart.normalize=minmax"])  # heart grid (16, 16)
    site = _site(tmp_path, {"ct": ("heart", DCM_DATA / "CT_small.dcm"), "mr": ("heart", DCM_DATA / "MR_small.dcm")})
    batch = next(iter(make_loader(SiteDataset(site, cfg), cfg, shuffle=False)))
    assert batch.images["heart"].shape == (2, 1, 16, 16)
    ct = pydicom.dcmread(DCM_DATA / "CT_small.dcm").pixel_array.astype(np.float64)
    expected = ((ct - ct.min()) / (ct.max() - ct.min()))[::-1, ::-1].T  # canonical RAS, as above
    np.testing.assert_allclose(batch.images["heart"][0, 0].numpy(), expected[56:72, 56:72], atol=1e-6)


def test_real_4d_nifti_for_a_3d_organ_is_refused_naming_shapes(tmp_path):
    cfg = tiny_config()
    site = _site(tmp_path, {"fmri": ("brain", NIB_DATA / "example4d.nii.gz")})
    with pytest.raises(CohortError, match=r"row 2, file img/fmri.nii.gz: organ 'brain' needs a 3D image .*\(128, 96, 24, 2\) \(4D\)"):
        SiteDataset(site, cfg)
