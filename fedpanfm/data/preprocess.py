"""Turn one organ image into the fixed grid the model sees (per-organ ``OrganSpec``).

Steps, in order, all our reconstruction (the papers give no preprocessing):

1. dimensionality check: the image must have as many axes as the organ's grid;
2. resampling from the file's spacing to ``spec.spacing`` (linear interpolation; an empty
   ``spec.spacing`` keeps the file's voxels as they are);
3. intensity normalisation over the whole resampled image (``zscore``, ``minmax``,
   ``percentile`` = clip to ``spec.clip_percentiles`` then min-max, or ``none``). Statistics come
   from the full field of view rather than the crop so that the same anatomy gets the same
   intensities whatever the crop keeps;
4. centre crop / pad to ``spec.grid``. Padding uses the minimum of the normalised image: it is
   the background (air, outside the body) in MR and CT, whereas padding with 0 would paint a
   mean-intensity frame after z-scoring. An odd remainder goes to the end of the axis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedpanfm.config import OrganSpec
from fedpanfm.data.manifest import CohortError


def check_dims(shape: tuple[int, ...], spec: OrganSpec, organ: str, source: str) -> None:
    """Raise :class:`CohortError` unless an image of ``shape`` fits the organ's grid rank.

    Args:
        shape: the image shape (singleton axes already squeezed).
        spec: the organ's preprocessing spec.
        organ: the organ name (for the message).
        source: names the file (and site / row) in the message.
    """
    if len(shape) != len(spec.grid):
        raise CohortError(
            f"{source}: organ {organ!r} needs a {len(spec.grid)}D image (grid {list(spec.grid)}), "
            f"the file holds shape {tuple(shape)} ({len(shape)}D)"
        )


def resample(image: torch.Tensor, spacing: tuple[float, ...], target: list[float]) -> torch.Tensor:
    """Resample ``image`` (spatial dims only) from ``spacing`` to ``target`` mm.

    Args:
        image: float tensor of shape (*spatial).
        spacing: the file's voxel spacing in mm, one value per axis.
        target: the wanted spacing; empty keeps the image as it is.
    """
    if not target:
        return image
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.shape, spacing, target)]
    if list(image.shape) == size:
        return image
    mode = "trilinear" if image.ndim == 3 else "bilinear"
    return F.interpolate(image[None, None], size=size, mode=mode, align_corners=False)[0, 0]


def normalize(image: torch.Tensor, method: str, clip_percentiles: list[float]) -> torch.Tensor:
    """Intensity normalisation; a constant image becomes all zeros (no division by zero).

    Args:
        image: float tensor.
        method: ``zscore``, ``minmax``, ``percentile`` or ``none``.
        clip_percentiles: [low, high] percentiles for ``percentile``.
    """
    if method == "none":
        return image
    if method == "zscore":
        std = image.std(unbiased=False)
        centred = image - image.mean()
        return centred / std if std > 0 else centred
    if method == "percentile":
        lo, hi = np.percentile(image.numpy(), clip_percentiles)
        image = image.clamp(float(lo), float(hi))
    elif method != "minmax":
        raise ValueError(f"unknown normalisation {method!r}")
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else image - lo


def crop_or_pad(image: torch.Tensor, grid: list[int], fill: float) -> torch.Tensor:
    """Centre crop or pad each axis of ``image`` to ``grid``; pads with ``fill``.

    Args:
        image: tensor of shape (*spatial), same rank as ``grid``.
        grid: target size per axis.
        fill: the padding value.
    """
    out = torch.full(tuple(grid), fill, dtype=image.dtype)
    src, dst = [], []
    for n, g in zip(image.shape, grid):
        if n >= g:
            start = (n - g) // 2
            src.append(slice(start, start + g))
            dst.append(slice(0, g))
        else:
            start = (g - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = image[tuple(src)]
    return out


def preprocess(
    image: np.ndarray, spacing: tuple[float, ...], spec: OrganSpec, organ: str, source: str
) -> np.ndarray:
    """One organ image -> float32 array (1, *spec.grid) (steps in the module docstring).

    Args:
        image: the voxel array from ``read_image`` (singleton axes squeezed).
        spacing: its voxel spacing in mm, one value per axis.
        spec: the organ's preprocessing spec (``cfg.data.organs[organ]``).
        organ: the organ name (for messages).
        source: names the file (and site / row) in error messages.
    """
    check_dims(image.shape, spec, organ, source)
    if image.size == 0:
        raise CohortError(f"{source}: organ {organ!r}: the image is empty, shape {image.shape}")
    if not np.isfinite(image).all():
        raise CohortError(f"{source}: organ {organ!r}: the image holds NaN or infinite values")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = resample(x, tuple(spacing), list(spec.spacing))
    x = normalize(x, spec.normalize, list(spec.clip_percentiles))
    x = crop_or_pad(x, list(spec.grid), float(x.min()))
    out = x.numpy().astype(np.float32, copy=False)[None]
    if not np.isfinite(out).all():
        raise CohortError(f"{source}: organ {organ!r}: preprocessing produced non-finite values")
    return out
