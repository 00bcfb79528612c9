"""Canonical orientation: every image array is brought to RAS+ axis order before preprocessing.

An image's geometry is its 4x4 affine from array index (i, j, k) to patient coordinates in mm,
RAS+ (x grows toward the patient's Right, y toward Anterior, z toward Superior), the NIfTI
convention. DICOM's patient coordinates are LPS+; :func:`lps_to_ras` converts them.

The canonical array is the stored array with its axes permuted and flipped so that axis 0 runs
toward R, axis 1 toward A and axis 2 toward S (``nibabel.orientations.io_orientation``, the rule
``nibabel.as_closest_canonical`` and MONAI's ``Orientation("RAS")`` use). No voxel is
interpolated: an oblique acquisition gets the *nearest* canonical order, each array axis going to
the world axis its direction is closest to, and keeps its obliquity (reported by
:func:`obliquity_deg`). Our choice, because resampling an oblique scan onto a world-aligned
grid would blur it once more before the resampling to the organ's spacing; a site with strongly
oblique scans sees the angle in ``fedpanfm cohort preview``.
"""

from __future__ import annotations

import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

#: LPS+ (DICOM) <-> RAS+ (NIfTI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """The same geometry with world coordinates in RAS+ instead of LPS+ (an involution)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def axis_codes(affine: np.ndarray) -> str:
    """Where each array axis points, e.g. ``"RAS"`` or ``"LPS"`` (nearest world axis)."""
    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns."""
    return tuple(float(v) for v in voxel_sizes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def obliquity_deg(affine: np.ndarray) -> float:
    """The largest angle (degrees) between an array axis and the world axis it was assigned to."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(a) / np.linalg.norm(a, axis=0, keepdims=True)
    return float(np.degrees(np.arccos(np.clip(cosines.max(axis=0).min(), -1.0, 1.0))))


def canonical_geometry(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) that :func:`to_canonical` gives an array of ``shape``, without the array."""
    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    spatial = [0, 0, 0]
    for src, (dst, _) in enumerate(ornt):
        spatial[int(dst)] = shape[src]
    return (*spatial, *shape[3:]), affine @ inv_ornt_aff(ornt, shape[:3])


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) permuted / flipped to RAS+ axis order; trailing axes (frames) kept.

    Args:
        array: at least 3 axes; the first 3 are spatial (pad a 2D image with a singleton axis).
        affine: 4x4 index -> RAS+ mm affine of ``array``'s first 3 axes.

    Returns:
        The canonical array (a contiguous copy) and its affine; ``canonical_affine @ [i, j, k, 1]``
        is the same world point as the stored voxel it came from.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim < 3 or affine.shape != (4, 4):
        raise ValueError(f"to_canonical needs a >= 3D array and a 4x4 affine, got {array.shape}, {affine.shape}")
    ornt = io_orientation(affine)
    out = np.ascontiguousarray(apply_orientation(array, ornt))
    return out, affine @ inv_ornt_aff(ornt, array.shape[:3])


__all__ = [
    "LPS_TO_RAS",
    "axis_codes",
    "canonical_geometry",
    "lps_to_ras",
    "obliquity_deg",
    "spacing_of",
    "to_canonical",
]
