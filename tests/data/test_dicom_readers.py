"""DICOM as it comes: series and enhanced multi-frame files written with pydicom from a known
volume read back to the same canonical array as the volume's NIfTI; pydicom's shipped files
(an enhanced-style SEG, MONOCHROME1 radiographs); missing tags as errors or named warnings."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from fedpanfm.data.manifest import CohortError
from fedpanfm.data.readers import load_image, probe_image, read_image

DCM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
SPACING = (0.8, 1.1, 2.5)  # canonical x (R), y (A), z (S) in mm
ORIGIN = np.array([-20.0, 15.0, -7.5])  # RAS+ of canonical voxel (0, 0, 0)

# (row direction, column direction) in LPS+, as written to ImageOrientationPatient.
PLANES = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "axial flipped": ((-1, 0, 0), (0, -1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


def _volume(shape=(7, 6, 5), seed=0) -> np.ndarray:
    """A canonical (RAS) volume of whole HU values, every voxel different."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(-1000, -1000 + np.prod(shape))).reshape(shape).astype(np.float32)


def _ras_axis(lps: tuple[int, int, int]) -> tuple[int, int]:
    ras = np.array(lps, float) * [-1, -1, 1]
    axis = int(np.argmax(np.abs(ras)))
    return axis, int(np.sign(ras[axis]))


def _layout(volume: np.ndarray, row_dir, col_dir):
    """The stored (slice, row, column) array of ``volume`` for the plane and each slice's IPP (LPS)."""
    normal = tuple(int(v) for v in np.cross(row_dir, col_dir))
    axes = [_ras_axis(normal), _ras_axis(col_dir), _ras_axis(row_dir)]  # slice, row, column
    stored = np.transpose(volume, [a for a, _ in axes])
    for k, (_, sign) in enumerate(axes):
        if sign < 0:
            stored = np.flip(stored, axis=k)
    spacing = [SPACING[a] for a, _ in axes]
    positions = []
    for k in range(stored.shape[0]):
        index = np.zeros(3)
        for d, (a, sign) in enumerate(axes):
            step = k if d == 0 else 0
            index[a] = step if sign > 0 else volume.shape[a] - 1 - step
        ras = ORIGIN + index * np.asarray(SPACING)
        positions.append([-ras[0], -ras[1], ras[2]])
    return np.ascontiguousarray(stored), spacing, positions


def _base(sop_class, modality: str, rows: int, cols: int, series: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = modality, series
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_series(folder: Path, volume: np.ndarray, plane: str, drop: str = "") -> Path:
    """One CT file per slice (stored = HU + 1024, intercept -1024), file names in shuffled order."""
    stored, spacing, positions = _layout(volume, *PLANES[plane])
    folder.mkdir(parents=True)
    series = generate_uid()
    names = list(range(stored.shape[0]))
    random.Random(1).shuffle(names)
    for k in range(stored.shape[0]):
        ds = _base(CTImageStorage, "CT", *stored.shape[1:], series)
        ds.ImageOrientationPatient = [*PLANES[plane][0], *PLANES[plane][1]]
        ds.ImagePositionPatient = positions[k]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.InstanceNumber = k + 1
        ds.PixelData = (stored[k] + 1024).astype(np.uint16).tobytes()
        if drop and k == 2:
            delattr(ds, drop)
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
    return folder


def write_enhanced(path: Path, volumes: list[np.ndarray], plane: str = "sagittal", shared_measures: bool = True) -> Path:
    """One enhanced MR file: frames of every volume (temporal positions) in shuffled order, per-frame
    positions and rescale (alternating intercepts), orientation and spacing in the shared groups."""
    layouts = [_layout(v, *PLANES[plane]) for v in volumes]
    slices, rows, cols = layouts[0][0].shape
    spacing = layouts[0][1]
    ds = _base(EnhancedMRImageStorage, "MR", rows, cols, generate_uid())
    frames = [(t, k) for t in range(len(volumes)) for k in range(slices)]
    random.Random(2).shuffle(frames)
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [*PLANES[plane][0], *PLANES[plane][1]]
    shared.PlaneOrientationSequence = Sequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [spacing[1], spacing[2]]
    measures.SliceThickness = spacing[0]
    if shared_measures:
        shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, pixels = [], []
    for i, (t, k) in enumerate(frames):
        group = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = layouts[t][2][k]
        group.PlanePositionSequence = Sequence([pos])
        value = Dataset()
        value.RescaleSlope, value.RescaleIntercept = 1, -1024 - 24 * (i % 2)
        group.PixelValueTransformationSequence = Sequence([value])
        content = Dataset()
        content.TemporalPositionIndex = t + 1
        group.FrameContentSequence = Sequence([content])
        per_frame.append(group)
        pixels.append((layouts[t][0][k] + 1024 + 24 * (i % 2)).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _nifti(path: Path, volume: np.ndarray) -> Path:
    """The canonical volume written as a NIfTI stored LAS (x reversed), with its true geometry."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    stored = volume[::-1]
    affine[:3, 3] += affine[:3, 0] * (volume.shape[0] - 1)
    affine[:3, 0] *= -1
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(stored), affine), path)
    return path


# --------------------------------------------------------------------------- series and enhanced vs NIfTI


@pytest.mark.parametrize("plane", list(PLANES))
def test_dicom_series_gives_the_same_array_as_the_volume_and_its_nifti(tmp_path, plane):
    volume = _volume()
    image = load_image(write_series(tmp_path / "ct", volume, plane))
    nifti = load_image(_nifti(tmp_path / "ct.nii.gz", volume))
    np.testing.assert_array_equal(image.array, volume)
    np.testing.assert_array_equal(nifti.array, volume)
    assert image.spacing == pytest.approx(SPACING, abs=1e-9) and nifti.spacing == pytest.approx(SPACING, abs=1e-6)
    np.testing.assert_allclose(image.affine, nifti.affine, atol=1e-6)  # same world geometry too
    assert image.modality == "CT" and nifti.orientation == "LAS"
    info = probe_image(tmp_path / "ct")
    assert info.shape == volume.shape and info.modality == "CT"


def test_enhanced_multiframe_uses_per_frame_groups_and_sorts_frames(tmp_path):
    volume = _volume()
    path = write_enhanced(tmp_path / "emr.dcm", [volume])
    image = load_image(path)
    # Per-frame intercepts differ (-1024 / -1048): a top-level-only reader would be off by 24 HU.
    np.testing.assert_array_equal(image.array, volume)
    assert image.spacing == pytest.approx(SPACING, abs=1e-9) and image.modality == "MR"
    np.testing.assert_allclose(image.affine, load_image(_nifti(tmp_path / "v.nii.gz", volume)).affine, atol=1e-6)


def test_enhanced_multiframe_with_temporal_positions_is_4d_and_frame_picks_one(tmp_path):
    v0, v1 = _volume(seed=0), _volume(seed=1)
    path = write_enhanced(tmp_path / "cine.dcm", [v0, v1], plane="axial")
    whole = read_image(path)[0]
    assert whole.shape == (*v0.shape, 2)
    np.testing.assert_array_equal(whole[..., 0], v0)
    np.testing.assert_array_equal(whole[..., 1], v1)
    np.testing.assert_array_equal(read_image(path, frame=1)[0], v1)
    assert probe_image(path).shape == (*v0.shape, 2) and probe_image(path, frame=0).shape == v0.shape


# --------------------------------------------------------------------------- shipped files


def test_shipped_functional_group_file_takes_spacing_from_pixel_measures():
    """liver_1frame.dcm (a SEG) has PixelSpacing only in its functional groups: 0.810547 mm, not 1 mm."""
    path = DCM_DATA / "liver_1frame.dcm"
    ds = pydicom.dcmread(path)
    assert "PixelSpacing" not in ds
    arr, spacing = read_image(path)
    assert spacing == pytest.approx((0.810547, 0.810547))
    # Axial (rows toward P, columns toward L): canonical = reversed columns, reversed rows.
    np.testing.assert_array_equal(arr, ds.pixel_array.astype(np.float32)[::-1, ::-1].T)
    world = load_image(path).affine @ [511, 511, 0, 1]  # canonical (0, 0) is stored (511, 511)
    ipp = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    np.testing.assert_allclose(world[:3], [-float(ipp[0]), -float(ipp[1]), float(ipp[2])], atol=1e-4)


def test_monochrome1_radiograph_is_inverted_with_warnings_naming_the_file(caplog):
    """CR1/6154: MONOCHROME1, 12 bits stored, slope 0.684, intercept 200, ImagerPixelSpacing only, no IOP."""
    path = DCM_DATA / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds = pydicom.dcmread(path)
    with caplog.at_level(logging.WARNING, logger="fedpanfm.data.dicom"):
        arr, spacing = read_image(path)
    f = lambda x: np.asarray(x, np.float64) * 0.684 + 200.0  # noqa: E731
    expected = f(0) + f(4095) - f(ds.pixel_array)  # reflected within the stored range [0, 2^12 - 1]
    np.testing.assert_allclose(arr, expected, rtol=1e-6)  # geometry unknown: stored order kept
    assert spacing == pytest.approx((0.1, 0.1))
    assert f"{path}: no PixelSpacing; using ImagerPixelSpacing" in caplog.text
    assert f"{path}: no ImagePositionPatient/ImageOrientationPatient: orientation unknown" in caplog.text
    # Bright now means dense: the inverted image correlates negatively with the stored values.
    assert np.corrcoef(arr.ravel(), ds.pixel_array.ravel())[0, 1] == pytest.approx(-1.0)


# --------------------------------------------------------------------------- missing tags


def test_missing_geometry_in_a_series_is_an_error_naming_the_file(tmp_path):
    volume = _volume()
    for tag in ("ImagePositionPatient", "PixelSpacing"):
        folder = write_series(tmp_path / tag, volume, "axial", drop=tag)
        with pytest.raises(CohortError, match=rf"{tmp_path / tag}/IM\d{{4}}.*{tag}"):
            read_image(folder)


def test_enhanced_without_pixel_measures_is_an_error_naming_the_frame(tmp_path):
    path = write_enhanced(tmp_path / "nomeasures.dcm", [_volume()], shared_measures=False)
    with pytest.raises(CohortError, match=r"nomeasures.dcm frame 1: no PixelSpacing"):
        probe_image(path)


def test_ct_without_rescale_and_ct_in_monochrome1_warn_and_keep_values(tmp_path, caplog):
    volume = _volume(shape=(4, 3, 1))
    folder = write_series(tmp_path / "one", volume, "axial")
    f = next(folder.iterdir())
    ds = pydicom.dcmread(f)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(f)
    with caplog.at_level(logging.WARNING, logger="fedpanfm.data.dicom"):
        arr, _ = read_image(f)
    np.testing.assert_array_equal(arr, volume[..., 0] + 1024)  # stored values, not inverted
    assert f"{f}: CT without RescaleSlope/RescaleIntercept" in caplog.text
    assert f"{f}: MONOCHROME1 CT: values kept in physical units" in caplog.text


def _classic_multiframe(path: Path, stored: np.ndarray, positions, spacing, **tags) -> Path:
    ds = _base(CTImageStorage, "CT", *stored.shape[1:], generate_uid())
    ds.NumberOfFrames = stored.shape[0]
    ds.ImageOrientationPatient = [*PLANES["axial"][0], *PLANES["axial"][1]]
    ds.ImagePositionPatient = positions[0]
    ds.PixelSpacing = [spacing[1], spacing[2]]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = (stored + 1024).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_classic_multiframe_is_a_stack_with_spacing_between_slices_or_frames_in_time(tmp_path):
    volume = _volume()
    stored, spacing, positions = _layout(volume, *PLANES["axial"])
    stack = _classic_multiframe(tmp_path / "nm.dcm", stored, positions, spacing, SpacingBetweenSlices=spacing[0])
    np.testing.assert_array_equal(read_image(stack)[0], volume)
    assert read_image(stack)[1] == pytest.approx(SPACING)
    cine = _classic_multiframe(tmp_path / "cine.dcm", stored, positions, spacing, FrameIncrementPointer=0x00181063)
    frames = read_image(cine)[0]  # one plane, frames in time: (x, y, frames)
    assert frames.shape == (7, 6, 5)
    np.testing.assert_array_equal(frames[..., 3], stored[3][::-1, ::-1].T)  # an axial plane, canonical
    with pytest.raises(CohortError, match=r"bare.dcm: multi-frame DICOM without per-frame geometry"):
        read_image(_classic_multiframe(tmp_path / "bare.dcm", stored, positions, spacing))
