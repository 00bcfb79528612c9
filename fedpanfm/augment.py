"""Batched, per-organ image augmentation for the self-distillation views.

Every image of an organ stack ``(n, 1, *grid)`` (2D or 3D) gets its own random transform, drawn
in one go for the whole stack and applied on the stack's device with no per-image Python loop:

1. spatial: rotation (each plane in 3D), isotropic zoom and shift about the grid centre, resampled
   by MONAI's batched :class:`monai.networks.layers.AffineTransform` (bilinear, border padding);
   optional flips along the configured axes (none by default: organs have a side) and optional
   quarter turns in the image plane (MONAI ``RandRotate90``'s rule, batched; exact, so they keep
   the fine structure that bilinear resampling blurs);
2. contrast: gamma of the image min-max scaled to [0, 1], mapped back to its range
   (MONAI's ``AdjustContrast`` rule, batched);
3. a smooth multiplicative bias field: ``exp`` of a random 3-per-axis control grid, interpolated;
4. intensity gain and bias;
5. Gaussian noise with a per-image std.

All random numbers come from one CPU ``torch.Generator`` (or the global RNG), or, in training,
from :class:`~fedpanfm.global_batch.RowDraws` keyed by each image's place in the site's global
batch (so a data-parallel rank draws for its images what one device would); either way a view is
reproducible from the seed whatever the device. Ranges: ``cfg.train.augment``
(docs/method.md, "Views and augmentations").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform
from torch import Tensor

from fedpanfm.config import AugmentConfig, AugmentRanges
from fedpanfm.global_batch import Draws, GeneratorDraws, RowDraws

#: Where the random numbers come from: a generator, per-image draws, or None (global RNG).
DrawSource = torch.Generator | Draws | None

# Normalised coordinates (F.affine_grid convention, align_corners=False): theta maps output to
# input grid positions in [-1, 1] per axis, listed in image axis order (MONAI reverses them).
_RESAMPLE = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False,
                            reverse_indexing=True)
_BIAS_FIELD_POINTS = 3


def _draws(n: int, source: DrawSource) -> Draws:
    """Per-image draws for ``n`` images from a generator, the global RNG or draws already made."""
    return source if isinstance(source, (RowDraws, GeneratorDraws)) else GeneratorDraws(n, source)


def _uniform(draws: Draws, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * draws.rand(*shape, dtype=torch.float64)


def _rotation(angles: Tensor, ndim: int) -> Tensor:
    """(n, ndim, ndim) rotations: one angle per image in 2D, (n, 3) angles (one per plane) in 3D."""
    if ndim == 2:
        c, s = angles.cos(), angles.sin()
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rot = torch.eye(3, dtype=angles.dtype).expand(angles.shape[0], 3, 3)
    for plane, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
        c, s = angles[:, plane].cos(), angles[:, plane].sin()
        r = torch.eye(3, dtype=angles.dtype).repeat(angles.shape[0], 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        rot = r @ rot
    return rot


def affine_thetas(n: int, grid: tuple[int, ...], ranges: AugmentRanges, generator: DrawSource) -> Tensor:
    """(n, ndim, ndim + 1) float32 normalised affines: rotation, zoom and shift about the centre.

    The rotation acts in voxel units (``D^-1 R D`` with ``D`` the half-sizes), so a non-cubic grid
    is rotated, not sheared; a zoom ``s`` > 1 enlarges the content (samples a smaller region).
    """
    ndim = len(grid)
    n_angles = 1 if ndim == 2 else 3
    draws = _draws(n, generator)
    limit = math.radians(ranges.rotate_deg)
    angles = _uniform(draws, -limit, limit, n_angles)
    rot = _rotation(angles.squeeze(1) if ndim == 2 else angles, ndim)
    zoom = _uniform(draws, ranges.scale[0], ranges.scale[1])
    half = torch.tensor(grid, dtype=torch.float64) / 2
    linear = (rot / zoom[:, None, None]) * half[None, None, :] / half[None, :, None]
    shift = _uniform(draws, -ranges.translate, ranges.translate, ndim) * 2
    return torch.cat([linear, shift[..., None]], dim=-1).float()


def quarter_turn(x: Tensor, generator: DrawSource = None) -> Tensor:
    """Each image of ``x`` (n, 1, *grid) turned by its own random k x 90 degrees in the last two axes.

    A square plane takes k in {0, 1, 2, 3}; a non-square one k in {0, 2} (a quarter turn would
    change the grid's shape).
    """
    n, (h, w) = x.shape[0], x.shape[-2:]
    draws = _draws(n, generator)
    k = draws.randint(4) if h == w else 2 * draws.randint(2)
    out = x.clone()
    for turns in k.unique().tolist():
        rows = (k == turns).nonzero().squeeze(1).to(x.device)
        out[rows] = torch.rot90(x[rows], int(turns), dims=(-2, -1))
    return out


def augment_stack(images: Tensor, ranges: AugmentRanges, generator: DrawSource = None) -> Tensor:
    """One random transform per image of ``images`` (n, 1, *grid), 2D or 3D; same shape and device.

    Args:
        images: an organ's image stack (``SubjectBatch.images[organ]``).
        ranges: the organ's augmentation ranges.
        generator: CPU generator for every random draw, or :class:`RowDraws` for the stack's
            images (None: the global RNG).
    """
    if images.dim() not in (4, 5) or images.shape[1] != 1:
        raise ValueError(f"augment_stack: images {tuple(images.shape)} must be (n, 1, H, W) or (n, 1, D, H, W)")
    grid = tuple(images.shape[2:])
    ndim = len(grid)
    bad = [a for a in ranges.flip_axes if a >= ndim]
    if bad:
        raise ValueError(f"augment_stack: flip axis {bad[0]} outside a {ndim}D grid {grid} (train.augment flip_axes)")
    n = images.shape[0]
    if n == 0:
        return images
    dev, dtype = images.device, images.dtype
    x = images.float()
    draws = _draws(n, generator)
    theta = affine_thetas(n, grid, ranges, draws).to(dev)
    x = _RESAMPLE(x, theta)
    for axis in ranges.flip_axes:
        flip = (draws.rand() < 0.5).to(dev).view(n, *([1] * (ndim + 1)))
        x = torch.where(flip, x.flip(2 + axis), x)
    if ranges.quarter_turns:
        x = quarter_turn(x, draws)
    dims = tuple(range(1, ndim + 2))
    per_image = (n,) + (1,) * (ndim + 1)
    gamma = _uniform(draws, ranges.gamma[0], ranges.gamma[1]).float().to(dev).view(per_image)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    span = (hi - lo).clamp(min=1e-6)
    x = ((x - lo) / span).clamp(0.0, 1.0).pow(gamma) * span + lo
    if ranges.bias_field > 0:
        coarse = draws.randn(1, *([_BIAS_FIELD_POINTS] * ndim)) * ranges.bias_field
        field = F.interpolate(coarse.to(dev), size=grid, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
        x = x * field.exp()
    gain = _uniform(draws, ranges.gain[0], ranges.gain[1]).float().to(dev).view(per_image)
    bias = _uniform(draws, -ranges.shift, ranges.shift).float().to(dev).view(per_image)
    x = x * gain + bias
    if ranges.noise_std > 0:
        std = _uniform(draws, 0.0, ranges.noise_std).float().view(per_image)
        x = x + (draws.randn(*x.shape[1:]) * std).to(dev)
    return x.to(dtype)


class OrganAugmenter:
    """Applies each organ's ranges to its stack (``cfg.train.augment``).

    Args:
        cfg: the augmentation config; organs without an entry in ``cfg.organs`` use ``cfg.ranges``.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def ranges(self, organ: str) -> AugmentRanges:
        return self.cfg.organs.get(organ, self.cfg.ranges)

    def __call__(self, organ: str, images: Tensor, generator: DrawSource = None) -> Tensor:
        """``images`` of ``organ`` (n, 1, *grid) augmented, or unchanged when augmentation is off."""
        if not self.cfg.enabled:
            return images
        return augment_stack(images, self.ranges(organ), generator)


__all__ = ["DrawSource", "OrganAugmenter", "affine_thetas", "augment_stack", "quarter_turn"]
