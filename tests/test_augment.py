"""Per-organ batched augmentation: reproducible, shape-keeping, per image, 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch

from fedpanfm.augment import OrganAugmenter, affine_thetas, augment_stack, quarter_turn
from fedpanfm.config import AugmentConfig, AugmentRanges

IDENTITY = dict(rotate_deg=0.0, translate=0.0, scale=[1.0, 1.0], gain=[1.0, 1.0], shift=0.0,
                gamma=[1.0, 1.0], noise_std=0.0, bias_field=0.0)


@pytest.mark.parametrize("shape", [(6, 1, 16, 12), (5, 1, 4, 8, 8)])
def test_reproducible_from_generator_shape_kept_and_per_image(shape) -> None:
    # smooth images (as organ crops are): white noise would decorrelate under any sub-voxel shift
    coarse = torch.randn(*shape[:2], *[2] * (len(shape) - 2), generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear" if len(shape) == 4 else "trilinear")
    r = AugmentRanges()
    a = augment_stack(x, r, torch.Generator().manual_seed(3))
    b = augment_stack(x, r, torch.Generator().manual_seed(3))
    c = augment_stack(x, r, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # two copies of one image in a stack get different transforms (per image, not per stack)
    twin = augment_stack(torch.cat([x[:1], x[:1]]), r, torch.Generator().manual_seed(5))
    assert (twin[0] - twin[1]).abs().mean() > 1e-2
    # and the transform stays mild: most of the image's structure survives
    corr = torch.corrcoef(torch.stack([a.flatten(), x.flatten()]))[0, 1]
    assert corr > 0.7


@pytest.mark.parametrize("shape", [(3, 1, 8, 12), (3, 1, 4, 6, 8)])
def test_identity_ranges_leave_images_unchanged(shape) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = augment_stack(x, AugmentRanges(**IDENTITY), torch.Generator().manual_seed(0))
    assert torch.allclose(y, x, atol=1e-5)


def test_shift_and_rotation_act_in_voxel_units() -> None:
    # A whole-voxel shift moves the image by exactly that many voxels on a non-square grid.
    g = torch.Generator().manual_seed(0)
    theta = affine_thetas(200, (8, 12), AugmentRanges(**{**IDENTITY, "translate": 0.25}), g)
    assert theta[:, :, 2].abs().max() <= 0.5 + 1e-6 and theta[:, :, 2].abs().max() > 0.3
    # rotation only: in voxel units the linear part is orthogonal (no shear from the aspect ratio)
    theta = affine_thetas(50, (4, 8, 16), AugmentRanges(**{**IDENTITY, "rotate_deg": 15.0}), g)
    half = torch.tensor([2.0, 4.0, 8.0])
    vox = half[:, None] * theta[:, :, :3] / half[None, :]
    eye = torch.eye(3).expand(50, 3, 3)
    assert torch.allclose(vox @ vox.transpose(1, 2), eye, atol=1e-5)
    angle = torch.acos(((vox.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert angle.max() <= math.radians(15.0 * math.sqrt(3)) + 1e-4  # three planes, each <= 15 degrees


def test_flips_only_where_configured_and_disabled_is_identity() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    flipped = augment_stack(x, AugmentRanges(**{**IDENTITY, "flip_axes": [1]}), torch.Generator().manual_seed(0))
    is_flip = (flipped - x.flip(3)).flatten(1).abs().amax(1) < 1e-5
    is_same = (flipped - x).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_flip | is_same).all()) and 10 < int(is_flip.sum()) < 54
    with pytest.raises(ValueError, match="flip axis 2"):
        augment_stack(x, AugmentRanges(flip_axes=[2]))
    off = OrganAugmenter(AugmentConfig(enabled=False))
    assert off("heart", x) is x


def test_per_organ_ranges() -> None:
    cfg = AugmentConfig(organs={"brain": AugmentRanges(**IDENTITY)})
    aug = OrganAugmenter(cfg)
    x = torch.randn(4, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(aug("brain", x, torch.Generator().manual_seed(0)), x, atol=1e-5)
    assert not torch.allclose(aug("liver", x, torch.Generator().manual_seed(0)), x, atol=1e-2)
    assert aug.ranges("liver") is cfg.ranges


def test_quarter_turns_are_exact_and_each_image_draws_its_own() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 5, 5, generator=gen)
    out = quarter_turn(x, torch.Generator().manual_seed(1))
    turns = []
    for a, b in zip(x, out):
        # Exactly one of the four turns (no resampling: the voxel values are only permuted).
        match = [k for k in range(4) if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b)]
        assert len(match) == 1
        turns.append(match[0])
    assert set(turns) == {0, 1, 2, 3}
    # A non-square plane only takes half turns, and the 3D depth axis is never touched.
    y = torch.randn(32, 1, 3, 4, 6, generator=gen)
    out3 = quarter_turn(y, torch.Generator().manual_seed(2))
    assert out3.shape == y.shape
    assert all(torch.equal(b, a) or torch.equal(b, a.flip(-1, -2)) for a, b in zip(y, out3))
    # Through augment_stack with every other transform at identity: only turns, values kept.
    ranges = AugmentRanges(rotate_deg=0.0, translate=0.0, scale=[1.0, 1.0], gain=[1.0, 1.0], shift=0.0,
                           gamma=[1.0, 1.0], noise_std=0.0, bias_field=0.0, quarter_turns=True)
    got = augment_stack(x, ranges, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
