"""Resampling to an exact target spacing, with anti-aliasing on downsampled axes.

The output grid has exactly ``target`` mm between voxel centres and is centred on the input's
field of view: output voxel j of an axis sits at input index ``(n - 1) / 2 + (j - (m - 1) / 2) * t / s``
(n, s: input size and spacing; m = round(n * s / t), t: target). Centring is our choice: it
favours no side of the anatomy, and where the field of view is a whole number of target voxels it
is the grid of ``torch.nn.functional.interpolate(..., align_corners=False)``. MONAI's ``Spacing``
keeps the first voxel's centre instead; the two grids differ by less than one target voxel.

Values are interpolated linearly (``scipy.ndimage.affine_transform``, order 1, edge values
beyond the border). Before that, each axis downsampled by a factor k = t / s > 1 is smoothed by a
Gaussian of sigma = (k - 1) / 2 input voxels, the rule and kernel of MONAI's
``Resize(anti_aliasing=True)`` (``GaussianSmooth``: the Gaussian integrated over each voxel,
``approx="erf"``, truncated at 4 sigma; we normalise it to sum 1); without it, detail finer than
the new voxel folds back as false low-frequency patterns (aliasing). The borders are padded by odd
reflection (2 x edge - mirror), which keeps linear trends (a bias field, a ramp) unbent at the edge,
where MONAI's zero padding darkens the border and replicate padding would flatten them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

#: Gaussian truncated at this many sigmas (MONAI's and scipy's default).
TRUNCATE = 4.0


def target_size(shape: tuple[int, ...], spacing: tuple[float, ...], target: list[float]) -> list[int]:
    """Voxels per axis of the resampled image: the field of view in target voxels, rounded."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


def antialias_sigmas(spacing: tuple[float, ...], target: list[float]) -> list[float]:
    """Gaussian sigma per axis in input voxels: (t / s - 1) / 2 when downsampling, else 0."""
    return [max(0.0, (t / s - 1.0) / 2.0) for s, t in zip(spacing, target)]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """MONAI's voxel-integrated Gaussian (``approx="erf"``), normalised to sum 1."""
    from monai.networks.layers.convutils import gaussian_1d

    return gaussian_1d(torch.tensor(float(sigma)), truncated=TRUNCATE, approx="erf", normalize=True).numpy()


def smooth(x: np.ndarray, sigmas: list[float]) -> np.ndarray:
    """Separable Gaussian with odd-reflection borders (module docstring); sigma 0 skips an axis."""
    for axis, sigma in enumerate(sigmas):
        n = x.shape[axis]
        if sigma <= 0 or n == 1:
            continue
        kernel = gaussian_kernel(sigma).astype(np.float64)
        pad = len(kernel) // 2
        widths = [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)]
        padded = np.pad(x.astype(np.float64), widths, mode="reflect", reflect_type="odd")
        out = ndimage.correlate1d(padded, kernel, axis=axis, mode="nearest")
        x = out[tuple(slice(pad, pad + n) if a == axis else slice(None) for a in range(x.ndim))].astype(np.float32)
    return x


def resample(
    image: torch.Tensor, spacing: tuple[float, ...], target: list[float], antialias: bool = False
) -> torch.Tensor:
    """Resample ``image`` (spatial dims only) from ``spacing`` to exactly ``target`` mm.

    Args:
        image: float tensor of shape (*spatial).
        spacing: the image's voxel spacing in mm, one value per axis.
        target: the wanted spacing; empty keeps the image as it is.
        antialias: smooth downsampled axes first (module docstring).
    """
    if not target:
        return image
    if len(target) != image.ndim or len(spacing) != image.ndim:
        raise ValueError(f"resample: image {tuple(image.shape)}, spacing {spacing} and target {target} disagree")
    if np.allclose(spacing, target, rtol=1e-9, atol=0.0):
        return image
    x = image.detach().cpu().numpy().astype(np.float32, copy=False)
    if antialias:
        x = smooth(x, antialias_sigmas(tuple(spacing), target))
    size = target_size(x.shape, tuple(spacing), target)
    zoom = np.asarray(target, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    offset = (np.asarray(x.shape) - 1) / 2.0 - (np.asarray(size) - 1) / 2.0 * zoom
    out = ndimage.affine_transform(x, zoom, offset, output_shape=tuple(size), order=1, mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


__all__ = ["antialias_sigmas", "gaussian_kernel", "resample", "smooth", "target_size"]
