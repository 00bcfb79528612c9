"""Global and organ-subset views: subject / organ correspondence, never an empty view."""

from __future__ import annotations

import torch
from conftest import make_batch, tiny_config

from fedpanfm.augment import OrganAugmenter
from fedpanfm.model.views import make_views, organ_subsets

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
