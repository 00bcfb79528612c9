"""Draws keyed by a subject's place in the site's global batch: the parts of a batch, each drawn in
its own process-like context, draw exactly what the whole batch draws on one device."""

from __future__ import annotations

import pytest
import torch

from fedpanfm.augment import OrganAugmenter
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.global_batch import GlobalBatch, all_sum, global_batch, mean_denominator, row_draws
from fedpanfm.model.dex import DEXLayer
from fedpanfm.model.views import crop_size, make_views
from fedpanfm.sgm import OrganMasker
from tests.conftest import make_batch, tiny_config

ORGAN_SETS = [["brain", "heart", "liver"], ["heart", "liver"], ["heart"], ["brain", "heart"], ["brain", "liver"]]
#: A 5-subject global batch split as a 2-rank site splits it (rows 0-1 and 2-4).
SPLIT = [(0, 2), (2, 5)]


def _part(lo: int, hi: int, n: int = 5, seed: int = 11) -> GlobalBatch:
    return GlobalBatch(size=n, offset=lo, held=hi - lo, count=hi - lo, seed=seed, ranks=1)


def _view_rows(n_views: int, lo: int, hi: int, n: int = 5) -> list[int]:
    """The rows of a view-major stack of the global batch that hold subjects lo..hi-1."""
    return [v * n + b for v in range(n_views) for b in range(lo, hi)]


def test_row_draws_of_the_parts_are_the_rows_of_the_whole() -> None:
    whole = row_draws("x", torch.arange(10), 10)
    assert whole is None  # outside a micro-step: the caller's RNG
    with global_batch(_part(0, 5)):
        ref = row_draws("x", torch.arange(10), 10)
        assert ref is not None
        expected = ref.rand(3)
        other = row_draws("y", torch.arange(10), 10)
        assert other is not None and not torch.equal(other.rand(3), expected)  # purposes are independent
    for lo, hi in SPLIT:
        with global_batch(_part(lo, hi)):
            draws = row_draws("x", torch.arange(2 * (hi - lo)), 2 * (hi - lo))
            assert draws is not None
            assert torch.equal(draws.rand(3), expected[_view_rows(2, lo, hi)])
    # A rank's weightless stand-in (1 row, no subject) draws a valid slot: the global batch's first.
    stand_in = GlobalBatch(size=5, offset=0, held=1, count=0, seed=11)
    assert stand_in.slots(2).tolist() == [0, 5]
    with pytest.raises(ValueError, match="not a stack of 2-row views"):
        _part(0, 2).slots(3)


def test_views_and_masks_of_the_parts_are_those_of_the_whole() -> None:
    cfg = tiny_config(["train.augment.ranges.quarter_turns=true"])
    batch = make_batch(cfg, ORGAN_SETS, seed=3)
    organs = cfg.data.organ_set()
    augmenter = OrganAugmenter(cfg.train.augment)
    masker = OrganMasker(organs, cfg.train.masking)
    masker.update(torch.rand(10, len(organs), generator=torch.Generator().manual_seed(0)),
                  make_views(batch, 2, 0, (0.3, 0.6), None).global_views.present)
    num_patches = {o: cfg.data.organs[o].num_patches for o in organs}
    dex = DEXLayer(cfg.model.dim, 16, cfg.model.dex).train()
    crops = {o: crop_size(tuple(s.grid), tuple(s.patch), 0.5) for o, s in cfg.data.organs.items()}

    def draw(part: GlobalBatch, b: SubjectBatch):
        with global_batch(part):
            views = make_views(b, 2, 2, (0.3, 0.6), augmenter, crop_sizes=crops)
            organ_mask = masker.sample(views.global_views.present)
            patch_mask = masker.sample_patch_mask(views.global_views, organ_mask, num_patches)
            assert views.local_views is not None
            noise = dex.router_noise(views.global_views.size), dex.router_noise(views.local_views.size)
        return views, organ_mask, patch_mask, noise

    ref_views, ref_organs, ref_patches, ref_noise = draw(_part(0, 5), batch)
    assert ref_organs.any() and not torch.equal(ref_noise[0][:5], ref_noise[0][5:])
    for lo, hi in SPLIT:
        views, organ_mask, patch_mask, noise = draw(_part(lo, hi), batch.select(list(range(lo, hi))))
        g_rows = _view_rows(2, lo, hi)
        for kind in ("global_views", "local_views"):
            mine, ref = getattr(views, kind), getattr(ref_views, kind)
            assert torch.equal(mine.present, ref.present[g_rows]), kind
            for organ, idx in mine.index.items():
                # The ref rows of this part's images, in the part's row order.
                ref_pos = {int(r): i for i, r in enumerate(ref.index[organ])}
                picked = [ref_pos[g_rows[int(r)]] for r in idx]
                assert torch.equal(mine.images[organ], ref.images[organ][picked]), (kind, organ)
        assert torch.equal(organ_mask, ref_organs[g_rows])
        for organ, m in patch_mask.items():
            ref_pos = {int(r): i for i, r in enumerate(ref_views.global_views.index[organ])}
            picked = [ref_pos[g_rows[int(r)]] for r in views.global_views.index[organ]]
            assert torch.equal(m, ref_patches[organ][picked]), organ
        assert torch.equal(noise[0], ref_noise[0][g_rows])
        assert torch.equal(noise[1], ref_noise[1][g_rows])


def test_statistics_stay_local_without_sharing_ranks() -> None:
    x = torch.tensor([1.0, 2.0])
    with global_batch(_part(0, 2)):
        assert torch.equal(all_sum(x), x)
        assert torch.equal(mean_denominator(torch.tensor(7)), torch.tensor(7))
