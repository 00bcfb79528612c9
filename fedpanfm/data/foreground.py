"""The foreground (body) of an image: a mask for statistics and a bounding box for cropping.

Thresholds, our choices (docs/data.md, "Foreground"):

- CT: tissue above ``BODY_HU`` = -500 HU, halfway between air (-1000) and fat (about -100);
- any other modality: the initial threshold of FSL BET (Smith 2002), ``p2 + 0.1 (p98 - p2)``
  with p2 / p98 the 2nd / 98th intensity percentiles, which needs no units.

Connected pieces holding less than ``MIN_PIECE`` of the foreground (noise specks, streaks outside
the body) are dropped; larger ones (arms apart from the trunk, the table under a CT) stay, so a
crop never cuts anatomy that is merely not connected to the largest piece.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

BODY_HU = -500.0
MIN_PIECE = 0.01


def threshold(image: np.ndarray, modality: str) -> float:
    """The intensity above which a voxel is foreground (module docstring)."""
    if modality == "CT":
        return BODY_HU
    p2, p98 = np.percentile(image, [2.0, 98.0])
    return float(p2 + 0.1 * (p98 - p2))


def foreground_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Boolean mask of the foreground; all False for a constant image."""
    mask = np.asarray(image) > threshold(image, modality)
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_PIECE * sizes.sum()) + 1
        mask = np.isin(labels, keep)
    return mask


def foreground_box(mask: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> tuple[slice, ...]:
    """The mask's bounding box widened by ``margin_mm`` on every side (clipped to the image);
    the whole image when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis, (n, s) in enumerate(zip(mask.shape, spacing)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        pad = int(math.ceil(margin_mm / s - 1e-9))
        box.append(slice(max(0, int(hit[0]) - pad), min(n, int(hit[-1]) + 1 + pad)))
    return tuple(box)


__all__ = ["BODY_HU", "MIN_PIECE", "foreground_box", "foreground_mask", "threshold"]
