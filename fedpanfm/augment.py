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
from fedpanfm.global_batch import RowDraws

#: Where the random numbers come from: a generator, per-image keyed draws, or None (global RNG).
Draws = torch.Generator | RowDraws | None

# Normalised coordinates (F.affine_grid convention, align_corners=False): theta maps output to
# input grid positions in [-1, 1] per axis, listed in image axis order (MONAI reverses them).
_RESAMPLE = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False,
                            reverse_indexing=True)
_BIAS_FIELD_POINTS = 3


def _rand(n: int, draws: Draws, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, *shape) uniform numbers, one row per image (CPU)."""
    if isinstance(draws, RowDraws):
        return draws.rand(*shape, dtype=dtype)
    return torch.rand((n, *shape), generator=draws, dtype=dtype)


def _randn(n: int, draws: Draws, *shape: int) -> Tensor:
    """(n, *shape) standard normal numbers, one row per image (CPU)."""
    if isinstance(draws, RowDraws):
        return draws.randn(*shape)
    return torch.randn((n, *shape), generator=draws)


def _uniform(n: int, lo: float, hi: float, generator: Draws, *shape: int) -> Tensor:
    return lo + (hi - lo) * _rand(n, generator, *shape, dtype=torch.float64)


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


def affine_thetas(n: int, grid: tuple[int, ...], ranges: AugmentRanges, generator: Draws) -> Tensor:
    """(n, ndim, ndim + 1) float32 normalised affines: rotation, zoom and shift about the centre.

    The rotation acts in voxel units (``D^-1 R D`` with ``D`` the half-sizes), so a non-cubic grid
    is rotated, not sheared; a zoom ``s`` > 1 enlarges the content (samples a smaller region).
    """
    ndim = len(grid)
    n_angles = 1 if ndim == 2 else 3
    limit = math.radians(ranges.rotate_deg)
    angles = _uniform(n, -limit, limit, generator, n_angles)
    rot = _rotation(angles.squeeze(1) if ndim == 2 else angles, ndim)
    zoom = _uniform(n, ranges.scale[0], ranges.scale[1], generator)
    half = torch.tensor(grid, dtype=torch.float64) / 2
    linear = (rot / zoom[:, None, None]) * half[None, None, :] / half[None, :, None]
    shift = _uniform(n, -ranges.translate, ranges.translate, generator, ndim) * 2
    return torch.cat([linear, shift[..., None]], dim=-1).float()


def quarter_turn(x: Tensor, generator: Draws = None) -> Tensor:
    """Each image of ``x`` (n, 1, *grid) turned by its own random k x 90 degrees in the last two axes.

    A square plane takes k in {0, 1, 2, 3}; a non-square one k in {0, 2} (a quarter turn would
    change the grid's shape).
    """
    n, (h, w) = x.shape[0], x.shape[-2:]
    if isinstance(generator, RowDraws):
        u = generator.rand()
        k = (u * 4).long().clamp(max=3) if h == w else 2 * (u * 2).long().clamp(max=1)
    else:
        k = torch.randint(0, 4, (n,), generator=generator) if h == w else 2 * torch.randint(0, 2, (n,), generator=generator)
    out = x.clone()
    for turns in k.unique().tolist():
        rows = (k == turns).nonzero().squeeze(1).to(x.device)
        out[rows] = torch.rot90(x[rows], int(turns), dims=(-2, -1))
    return out


def augment_stack(images: Tensor, ranges: AugmentRanges, generator: Draws = None) -> Tensor:
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
    theta = affine_thetas(n, grid, ranges, generator).to(dev)
    x = _RESAMPLE(x, theta)
    for axis in ranges.flip_axes:
        flip = (_rand(n, generator) < 0.5).to(dev).view(n, *([1] * (ndim + 1)))
        x = torch.where(flip, x.flip(2 + axis), x)
    if ranges.quarter_turns:
        x = quarter_turn(x, generator)
    dims = tuple(range(1, ndim + 2))
    per_image = (n,) + (1,) * (ndim + 1)
    gamma = _uniform(n, ranges.gamma[0], ranges.gamma[1], generator).float().to(dev).view(per_image)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    span = (hi - lo).clamp(min=1e-6)
    x = ((x - lo) / span).clamp(0.0, 1.0).pow(gamma) * span + lo
    if ranges.bias_field > 0:
        coarse = _randn(n, generator, 1, *([_BIAS_FIELD_POINTS] * ndim)) * ranges.bias_field
        field = F.interpolate(coarse.to(dev), size=grid, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
        x = x * field.exp()
    gain = _uniform(n, ranges.gain[0], ranges.gain[1], generator).float().to(dev).view(per_image)
    bias = _uniform(n, -ranges.shift, ranges.shift, generator).float().to(dev).view(per_image)
    x = x * gain + bias
    if ranges.noise_std > 0:
        std = _uniform(n, 0.0, ranges.noise_std, generator).float().view(per_image)
        x = x + (_randn(n, generator, *x.shape[1:]) * std).to(dev)
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

    def __call__(self, organ: str, images: Tensor, generator: Draws = None) -> Tensor:
        """``images`` of ``organ`` (n, 1, *grid) augmented, or unchanged when augmentation is off."""
        if not self.cfg.enabled:
            return images
        return augment_stack(images, self.ranges(organ), generator)


__all__ = ["Draws", "OrganAugmenter", "affine_thetas", "augment_stack", "quarter_turn"]
