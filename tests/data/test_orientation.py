"""Canonical RAS orientation: one physical image, any storage order, one array.

The physical image is nibabel's own anatomical.nii (a real scan stored LAS). Each variant below
stores the same voxels in another axis order / direction with the affine that keeps every voxel's
world position, as a converter or another site would write it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel
import numpy as np
import pytest
from nibabel.testing import data_path

from fedpanfm.config import OrganSpec
from fedpanfm.data.manifest import CohortError
from fedpanfm.data.orientation import axis_codes, lps_to_ras, obliquity_deg, to_canonical
from fedpanfm.data.preprocess import preprocess
from fedpanfm.data.readers import load_image, probe_image, read_image

ANAT = Path(data_path) / "anatomical.nii"
EX4D = Path(data_path) / "example4d.nii.gz"


def _restore(data: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[int, ...]):
    """The same physical image with stored axes permuted by ``perm`` then ``flips`` reversed."""
    out, aff = np.transpose(data, perm), affine[:, list(perm) + [3]].copy()
    for a in flips:
        n = out.shape[a]
        out = np.flip(out, axis=a)
        aff[:3, 3] += aff[:3, a] * (n - 1)  # the new first voxel is the old last one
        aff[:3, a] *= -1
    return np.ascontiguousarray(out), aff


STORAGE_ORDERS = {
    "LAS (as shipped)": ((0, 1, 2), ()),
    "RAS": ((0, 1, 2), (0,)),
    "ALS (first two swapped)": ((1, 0, 2), ()),
    "SPL": ((2, 1, 0), (1,)),
    "IRP": ((2, 0, 1), (0, 1, 2)),
    "PIR": ((1, 2, 0), (0, 1, 2)),
}


def test_canonical_array_is_nibabels_closest_canonical():
    img = nibabel.load(ANAT)
    ref = nibabel.as_closest_canonical(img)
    arr, spacing = read_image(ANAT)
    np.testing.assert_array_equal(arr, np.asarray(ref.get_fdata(), dtype=np.float32))
    assert axis_codes(ref.affine) == "RAS" and spacing == (2.0, 2.0, 2.0)
    assert load_image(ANAT).orientation == "LAS"


def test_same_physical_image_in_six_storage_orders_gives_one_array(tmp_path):
    img = nibabel.load(ANAT)
    data, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
    reference, ref_spacing = read_image(ANAT)
    spec = OrganSpec(grid=[16, 16, 16], patch=[4, 4, 4], spacing=[3.0, 3.0, 3.0])
    ref_model = preprocess(reference, ref_spacing, spec, "brain", "ref")
    codes = set()
    for name, (perm, flips) in STORAGE_ORDERS.items():
        stored, aff = _restore(data, affine, perm, flips)
        path = tmp_path / f"{name.split()[0]}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(stored, aff), path)
        image = load_image(path)
        codes.add(image.orientation)
        assert image.orientation == name.split()[0]
        np.testing.assert_array_equal(image.array, reference, err_msg=name)
        assert image.spacing == ref_spacing
        assert probe_image(path).shape == reference.shape
        np.testing.assert_array_equal(preprocess(image.array, image.spacing, spec, "brain", name), ref_model)
    assert len(codes) == 6


def test_oblique_scan_takes_the_nearest_canonical_order_and_reports_its_angle(tmp_path):
    img = nibabel.load(ANAT)
    data = np.asarray(img.dataobj, dtype=np.float32)
    stored, aff = _restore(data, img.affine, (1, 0, 2), (2,))  # ALI
    angle = np.radians(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]  # about the S axis
    nibabel.save(nibabel.Nifti1Image(stored, rot @ aff), tmp_path / "oblique.nii.gz")
    image = load_image(tmp_path / "oblique.nii.gz")
    np.testing.assert_array_equal(image.array, read_image(ANAT)[0])  # no interpolation, same voxels
    assert image.obliquity == pytest.approx(12.0, abs=1e-3)
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert load_image(ANAT).obliquity == pytest.approx(0.0, abs=1e-6)


def test_to_canonical_keeps_every_voxel_at_its_world_position():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(4, 5, 6)).astype(np.float32)
    affine = np.array([[0, 0, -1.5, 10], [2.0, 0, 0, -3], [0, -0.7, 0, 5], [0, 0, 0, 1]])
    out, canon = to_canonical(arr, affine)
    assert axis_codes(affine) == "AIL" and axis_codes(canon) == "RAS"
    for idx in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        world = affine @ [*idx, 1]
        j = np.linalg.solve(canon, world)[:3]
        assert np.allclose(j, np.round(j)) and out[tuple(np.round(j).astype(int))] == arr[idx]
    # LPS <-> RAS is a sign flip of x and y, its own inverse.
    np.testing.assert_array_equal(lps_to_ras(lps_to_ras(affine)), affine)
    assert axis_codes(lps_to_ras(np.eye(4))) == "LPS"
    assert obliquity_deg(affine) == pytest.approx(0.0)


def test_4d_frame_choice_selects_one_canonical_volume(tmp_path):
    img = nibabel.load(EX4D)
    whole, _ = read_image(EX4D)
    assert whole.shape == (128, 96, 24, 2)  # 4D stays 4D without a frame choice
    frame1, spacing = read_image(EX4D, frame=1)
    ref = nibabel.as_closest_canonical(img.slicer[..., 1])
    np.testing.assert_array_equal(frame1, np.asarray(ref.get_fdata(), dtype=np.float32))
    assert probe_image(EX4D, frame=1).shape == frame1.shape == (128, 96, 24)
    assert spacing == pytest.approx(nibabel.affines.voxel_sizes(ref.affine))
    with pytest.raises(CohortError, match=r"example4d.nii.gz: frame 2 asked for, the image has 2"):
        read_image(EX4D, frame=2)


def test_zero_voxel_size_is_an_error_and_missing_orientation_a_warning(tmp_path, caplog):
    img = nibabel.Nifti1Image(np.ones((3, 4, 5), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_zooms((0.0, 2.0, 2.0))
    nibabel.save(img, tmp_path / "zero.nii.gz")
    for read in (read_image, probe_image):
        with pytest.raises(CohortError, match=r"zero.nii.gz: NIfTI header voxel size \(pixdim\) \(0.0, 2.0, 2.0\)"):
            read(tmp_path / "zero.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.ones((3, 4, 5), np.float32), None), tmp_path / "nocode.nii")
    with caplog.at_level(logging.WARNING, logger="fedpanfm.data.readers"):
        read_image(tmp_path / "nocode.nii")
    assert "nocode.nii: NIfTI with qform_code = sform_code = 0: orientation unknown" in caplog.text
