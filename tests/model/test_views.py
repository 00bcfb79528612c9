"""Global and organ-subset views: subject / organ correspondence, never an empty view."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.augment import OrganAugmenter
from fedpanfm.model.views import crop_size, crop_stack, make_views, organ_subsets

ORGAN_SETS = [["heart", "adipose", "liver", "kidney"], ["brain"], ["spleen", "pancreas", "heart"], ["adipose", "brain"]]


def test_global_views_hold_every_organ_of_their_subject_augmented_independently() -> None:
    cfg = tiny_config()
    batch = make_batch(cfg, ORGAN_SETS, seed=0)
    views = make_views(batch, 2, 3, (0.3, 0.6), OrganAugmenter(cfg.train.augment), torch.Generator().manual_seed(0))
    B = batch.size
    gv = views.global_views
    assert gv.size == 2 * B and views.n_views == 5
    assert torch.equal(gv.present, batch.present.repeat(2, 1))
    assert gv.subject_ids == batch.subject_ids * 2
    for organ, rows in batch.index.items():
        assert torch.equal(gv.index[organ], torch.cat([rows, rows + B]))
        n = len(rows)
        a, b = gv.images[organ][:n], gv.images[organ][n:]
        assert a.shape == batch.images[organ].shape
        assert not torch.allclose(a, b) and not torch.allclose(a, batch.images[organ])
        # still the same subject's image: closer to its own source than to another subject's
        if n > 1:
            own = (a - batch.images[organ]).pow(2).mean()
            other = (a - batch.images[organ].roll(1, 0)).pow(2).mean()
            assert own < other


def test_local_views_are_subsets_of_each_subjects_organs_never_empty() -> None:
    cfg = tiny_config()
    batch = make_batch(cfg, ORGAN_SETS, seed=1)
    B = batch.size
    views = make_views(batch, 2, 4, (0.3, 0.6), None, torch.Generator().manual_seed(1))
    lv = views.local_views
    assert lv is not None and lv.size == 4 * B
    assert lv.subject_ids == batch.subject_ids * 4
    src = batch.present.repeat(4, 1)
    assert bool((lv.present <= src).all())  # only organs the subject has
    assert bool(lv.present.any(dim=1).all())  # at least one each
    assert int(lv.present.sum()) < int(src.sum())  # and a real subset overall
    # without augmentation each kept image is exactly the subject's image of that organ
    for organ, rows in lv.index.items():
        k = batch.organ_names.index(organ)
        assert torch.equal(lv.present[:, k].nonzero().flatten(), rows.sort().values)
        src_pos = {int(r): i for i, r in enumerate(batch.index[organ])}
        for img, row in zip(lv.images[organ], rows.tolist()):
            assert torch.equal(img, batch.images[organ][src_pos[row % B]])


def test_organ_subsets_sizes_follow_the_keep_ratio() -> None:
    present = torch.ones(2000, 7, dtype=torch.bool)
    present[1000:, 3:] = False  # half the subjects have 3 organs
    keep = organ_subsets(present, (0.3, 0.6), torch.Generator().manual_seed(0))
    n7, n3 = keep[:1000].sum(1), keep[1000:].sum(1)
    assert set(n7.tolist()) <= {2, 3, 4} and set(n3.tolist()) <= {1, 2}
    assert not bool(keep[1000:, 3:].any())
    # every present organ is kept sometimes (uniform subsets, no organ favoured)
    rate = keep[:1000].float().mean(0)
    assert float(rate.min()) > 0.35 and float(rate.max()) < 0.55
    single = organ_subsets(torch.eye(3, dtype=torch.bool), (0.0, 0.0), torch.Generator().manual_seed(0))
    assert torch.equal(single, torch.eye(3, dtype=torch.bool))


def test_crop_size_is_whole_patches_between_one_and_all() -> None:
    assert crop_size((24, 24), (8, 8), 0.67) == (16, 16)
    assert crop_size((32, 32), (8, 8), 0.67) == (24, 24)
    assert crop_size((32, 16), (8, 4), 0.5) == (16, 8)
    assert crop_size((8, 8, 8), (4, 4, 4), 0.01) == (4, 4, 4)  # never below one patch
    assert crop_size((24, 24), (8, 8), 1.0) == (24, 24)
    with pytest.raises(ValueError, match="share"):
        crop_size((24, 24), (8, 8), 0.0)


@pytest.mark.parametrize("grid, size", [((12, 10), (8, 4)), ((8, 8, 8), (4, 4, 4))])
def test_crop_stack_takes_exact_windows_at_uniform_offsets(grid: tuple[int, ...], size: tuple[int, ...]) -> None:
    n = 400
    # Each pixel holds its own flat index: a window's first pixel says where the window starts.
    images = torch.arange(n * math.prod(grid), dtype=torch.float32).view(n, 1, *grid)
    out = crop_stack(images, size, torch.Generator().manual_seed(0), "test", torch.arange(n), n)
    assert out.shape == (n, 1, *size)
    starts = []
    for i in range(n):
        flat = int(out[i].flatten()[0]) - i * math.prod(grid)
        start = []
        for g in reversed(grid):
            start.append(flat % g)
            flat //= g
        start = start[::-1]
        window = images[(i, 0, *[slice(a, a + c) for a, c in zip(start, size)])]
        assert torch.equal(out[i, 0], window)
        starts.append(start)
    # every offset 0 .. grid - size occurs on every axis, and none beyond
    for a, (g, c) in enumerate(zip(grid, size)):
        assert {s[a] for s in starts} == set(range(g - c + 1))
    assert crop_stack(images, grid, None, "test", torch.arange(n), n) is images
    with pytest.raises(ValueError, match="does not fit"):
        crop_stack(images, tuple(g + 1 for g in grid), None, "test", torch.arange(n), n)


def test_local_crops_are_windows_of_their_subjects_images_globals_whole() -> None:
    cfg = tiny_config()
    batch = make_batch(cfg, ORGAN_SETS, seed=2)
    B = batch.size
    sizes = {o: crop_size(tuple(s.grid), tuple(s.patch), 0.5) for o, s in cfg.data.organs.items()}
    views = make_views(batch, 2, 3, (0.5, 1.0), None, torch.Generator().manual_seed(2), sizes)
    assert all(x.shape[2:] == batch.images[o].shape[2:] for o, x in views.global_views.images.items())
    lv = views.local_views
    assert lv is not None
    for organ, rows in lv.index.items():
        assert tuple(lv.images[organ].shape[2:]) == sizes[organ]
        src_pos = {int(r): i for i, r in enumerate(batch.index[organ])}
        for img, row in zip(lv.images[organ], rows.tolist()):
            source = batch.images[organ][src_pos[row % B], 0]
            windows = source
            for axis, c in enumerate(sizes[organ]):
                windows = windows.unfold(axis, c, 1)  # every window of the crop's size
            windows = windows.reshape(-1, *sizes[organ])
            assert any(torch.equal(w, img[0]) for w in windows)
