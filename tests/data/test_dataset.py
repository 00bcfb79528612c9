"""Preprocessing numerics, SiteDataset + on-disk cache, splits, site listing, collate, loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_site, tiny_config

from fedpanfm.config import OrganSpec
from fedpanfm.data import dataset as dataset_mod
from fedpanfm.data.batch import Subject
from fedpanfm.data.collate import collate_subjects, make_loader
from fedpanfm.data.dataset import SiteDataset, list_sites, open_site_dataset, pooled_dataset, split_subjects
from fedpanfm.data.manifest import CohortError
from fedpanfm.data.preprocess import crop_or_pad, normalize, preprocess, resample
from fedpanfm.organs import OrganSet

ORGAN_SETS = {"s0": ["brain", "heart"], "s1": ["heart"], "s2": ["liver", "brain", "kidney"], "s3": ["adipose"]}


# --------------------------------------------------------------------------- preprocessing


def test_resample_size_follows_physical_extent():
    x = torch.arange(24.0).reshape(4, 6)
    assert resample(x, (2.0, 1.0), [1.0, 3.0]).shape == (8, 2)
    assert resample(x, (1.0, 1.0), []) is x
    # Linear interpolation of a linear ramp along an axis stays a ramp with the same mean.
    y = resample(torch.arange(8.0)[None].repeat(4, 1), (1.0, 1.0), [1.0, 2.0])
    assert y.shape == (4, 4)
    assert torch.allclose(y[0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    assert resample(torch.zeros(4, 4, 4), (1.0, 1.0, 1.0), [2.0, 2.0, 0.5]).shape == (2, 2, 8)


def test_normalisations_against_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    z = normalize(x, "zscore", [0, 100])
    assert torch.allclose(z, (x - 2.5) / (1.25 ** 0.5))
    assert torch.allclose(normalize(x, "minmax", [0, 100]), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    assert torch.equal(normalize(x, "none", [0, 100]), x)
    y = torch.arange(101.0)
    p = normalize(y, "percentile", [10.0, 90.0])  # clip to [10, 90], then min-max
    assert p[0] == 0 and p[10] == 0 and p[50] == pytest.approx(0.5) and p[90] == 1 and p[100] == 1
    assert torch.equal(normalize(torch.full((3,), 7.0), "zscore", [0, 100]), torch.zeros(3))
    assert torch.equal(normalize(torch.full((3,), 7.0), "minmax", [0, 100]), torch.zeros(3))


def test_crop_or_pad_centres_with_odd_remainder_at_the_end():
    x = torch.arange(5.0)[None].repeat(2, 1)  # (2, 5)
    out = crop_or_pad(x, [5, 3], fill=-1.0)
    assert out.shape == (5, 3)
    assert torch.all(out[0] == -1) and torch.all(out[3:] == -1)  # pad 3 rows: 1 before, 2 after
    assert torch.equal(out[1], torch.tensor([1.0, 2.0, 3.0]))  # crop 5 -> 3 starts at 1


def test_preprocess_output_and_errors():
    spec = OrganSpec(grid=[4, 4], patch=[2, 2], spacing=[2.0, 2.0], normalize="minmax")
    img = np.tile(np.arange(8, dtype=np.float64), (8, 1))
    out = preprocess(img, (1.0, 1.0), spec, "heart", "f.nii")
    assert out.shape == (1, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    with pytest.raises(CohortError, match=r"f.nii: organ 'heart' needs a 2D image .*\(2, 3, 4\) \(3D\)"):
        preprocess(np.zeros((2, 3, 4)), (1, 1, 1), spec, "heart", "f.nii")
    bad = img.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CohortError, match="NaN or infinite"):
        preprocess(bad, (1.0, 1.0), spec, "heart", "f.nii")


# --------------------------------------------------------------------------- dataset + cache


def test_site_dataset_yields_subjects_with_their_organs_and_labels(tmp_path):
    cfg = tiny_config()
    make_site(tmp_path / "site_a", cfg, ORGAN_SETS)
    ds = SiteDataset(tmp_path / "site_a", cfg)
    assert len(ds) == 4 and ds.subject_ids == list(ORGAN_SETS) and ds.skipped == []
    assert ds.label_names == ["diabetes", "stroke"]
    s = ds[2]
    assert isinstance(s, Subject) and s.site == "site_a" and s.subject_id == "s2"
    assert sorted(s.images) == sorted(ORGAN_SETS["s2"])
    for organ, x in s.images.items():
        assert x.dtype == torch.float32 and x.shape == (1, *cfg.data.organs[organ].grid)
        assert torch.isfinite(x).all()
    assert s.labels["diabetes"] == 0.0 and s.labels["stroke"] == 0.0
    assert ds[1].labels["diabetes"] == 1.0 and np.isnan(ds[1].labels["stroke"])
    assert SiteDataset(tmp_path / "site_a", cfg, subjects=["s3", "s1"]).subject_ids == ["s3", "s1"]
    with pytest.raises(CohortError, match="subject.*not in manifest.csv: nobody"):
        SiteDataset(tmp_path / "site_a", cfg, subjects=["nobody"])


def test_cache_is_npy_keyed_by_file_and_spec_and_used_when_warm(tmp_path, monkeypatch):
    cfg = tiny_config()
    make_site(tmp_path / "site_a", cfg, ORGAN_SETS)
    cold = SiteDataset(tmp_path / "site_a", cfg)
    first = [cold[i] for i in range(len(cold))]
    cache = tmp_path / "site_a" / ".fedpanfm_cache"
    files = sorted(cache.iterdir())
    assert len(files) == sum(len(v) for v in ORGAN_SETS.values())
    assert all(f.suffix == ".npy" for f in files)  # no temporary files left behind
    np.load(files[0], allow_pickle=False)

    # Warm: neither construction nor loading may read or probe an image file.
    def refuse(*a, **k):
        raise AssertionError("image read on a warm cache")

    monkeypatch.setattr(dataset_mod, "read_image", refuse)
    monkeypatch.setattr(dataset_mod, "probe_image", refuse)
    warm = SiteDataset(tmp_path / "site_a", cfg)
    for a, b in zip(first, (warm[i] for i in range(len(warm)))):
        assert all(torch.equal(a.images[o], b.images[o]) for o in a.images)
    monkeypatch.undo()

    # Another spec for one organ -> new cache entries for that organ only.
    cfg2 = tiny_config(["data.organs.heart.normalize=minmax"])
    ds2 = SiteDataset(tmp_path / "site_a", cfg2)
    ds2[1]
    heart = ds2[0].images["heart"]
    assert heart.min() >= 0 and heart.max() <= 1 and heart.min() < 0.5 < heart.max()  # min-max of the full image, cropped
    assert first[0].images["heart"].min() < 0  # the z-scored version it replaced
    assert len(list(cache.iterdir())) == len(files) + 2  # s0 and s1 have a heart

    # A rewritten file (new mtime / size) is read again, not served stale from the cache.
    path = tmp_path / "site_a" / "img" / "s3_adipose.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((24, 24), np.float32) * np.arange(24), np.eye(4)), str(path))
    os.utime(path, ns=(1, 1))
    fresh = SiteDataset(tmp_path / "site_a", cfg)[3].images["adipose"]
    assert not torch.equal(fresh, first[3].images["adipose"])
    assert torch.allclose(fresh[0, 0, 5], fresh[0, 3, 5])  # the new image: constant along axis 0


def test_cache_dir_setting_and_cache_off(tmp_path):
    cfg = tiny_config([f"data.cache_dir={tmp_path / 'cache'}"])
    make_site(tmp_path / "site_a", cfg, {"s0": ["brain"]})
    SiteDataset(tmp_path / "site_a", cfg)[0]
    assert len(list((tmp_path / "cache" / "site_a").glob("brain-*.npy"))) == 1
    assert not (tmp_path / "site_a" / ".fedpanfm_cache").exists()
    off = tiny_config(["data.cache=false"])
    SiteDataset(tmp_path / "site_a", off)[0]
    assert not (tmp_path / "site_a" / ".fedpanfm_cache").exists()


def test_memory_cache_keeps_subjects_up_to_its_budget(tmp_path):
    cfg = tiny_config()
    make_site(tmp_path / "site_a", cfg, {"s0": ["brain"], "s1": ["brain"], "s2": ["brain"]})
    ds = SiteDataset(tmp_path / "site_a", cfg)
    assert ds[0] is ds[0]  # the default budget holds this site
    assert ds.subset(["s0"])[0] is ds[0]  # subsets share the parent's memory
    one = ds[0].images["brain"]
    size = one.numel() * one.element_size()
    # A budget of two subjects keeps the first two read, and reads the third from disk each time.
    tight = tiny_config([f"data.memory_cache_mib={2.5 * size / 2**20}"])
    ds = SiteDataset(tmp_path / "site_a", tight)
    first, second, third = ds[0], ds[1], ds[2]
    assert ds[0] is first and ds[1] is second and ds[2] is not third
    assert torch.equal(ds[2].images["brain"], third.images["brain"])
    off = SiteDataset(tmp_path / "site_a", tiny_config(["data.memory_cache_mib=0"]))
    assert off[0] is not off[0]


def test_open_site_dataset_reuses_until_the_manifest_or_data_config_changes(tmp_path, monkeypatch):
    cfg = tiny_config()
    make_site(tmp_path / "site_a", cfg, ORGAN_SETS)
    make_site(tmp_path / "site_b", cfg, {"s0": ["brain"]})
    opened = []
    real_init = SiteDataset.__init__

    def counting(self, site_dir, c, subjects=None):
        opened.append(Path(site_dir).name)
        real_init(self, site_dir, c, subjects)

    monkeypatch.setattr(dataset_mod, "_OPENED", type(dataset_mod._OPENED)())
    monkeypatch.setattr(SiteDataset, "__init__", counting)
    a = open_site_dataset(tmp_path / "site_a", cfg)
    assert open_site_dataset(tmp_path / "site_a", cfg) is a and opened == ["site_a"]
    b = open_site_dataset(tmp_path / "site_b", cfg)
    assert b is not a and b.subject_ids == ["s0"]  # one process, two sites: each its own entry
    # Another data config -> another dataset; the original stays cached.
    other = open_site_dataset(tmp_path / "site_a", tiny_config(["data.organs.heart.normalize=minmax"]))
    assert other is not a and open_site_dataset(tmp_path / "site_a", cfg) is a
    # A rewritten manifest (fewer rows) is read again.
    manifest = tmp_path / "site_a" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(l for l in lines if not l.startswith("s3,")) + "\n")
    again = open_site_dataset(tmp_path / "site_a", cfg)
    assert again is not a and "s3" not in again.subject_ids and len(again) == len(a) - 1
    # At most ``keep`` sites stay open, least recently used dropped first.
    n = len(opened)
    open_site_dataset(tmp_path / "site_b", cfg, keep=1)
    open_site_dataset(tmp_path / "site_a", cfg, keep=1)
    assert opened[n:] == ["site_a"] and len(dataset_mod._OPENED) == 1
    with pytest.raises(CohortError, match="site_c"):
        open_site_dataset(tmp_path / "site_c", cfg)


# --------------------------------------------------------------------------- splits and sites


def test_split_subjects_deterministic_disjoint_and_order_free():
    ids = [f"p{i:02d}" for i in range(20)]
    train, val = split_subjects(ids, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
    assert sorted(train + val) == ids
    assert split_subjects(list(reversed(ids)), 0.25, seed=3) == (train, val)
    assert split_subjects(ids, 0.25, seed=4)[1] != val
    assert split_subjects(["a", "b"], 0.1, 0)[1] != []  # at least one held out
    assert split_subjects(["a"], 0.5, 0) == (["a"], [])  # training keeps the only subject
    assert split_subjects(ids, 0.0, 0) == (ids, [])
    with pytest.raises(ValueError):
        split_subjects(ids, 1.0, 0)


def test_list_sites_and_pooled_dataset(tmp_path):
    cfg = tiny_config()
    make_site(tmp_path / "site_b", cfg, {"x": ["brain"], "y": ["heart"]})
    make_site(tmp_path / "site_a", cfg, {"x": ["liver"]})
    (tmp_path / "not_a_site").mkdir()
    assert [p.name for p in list_sites(tmp_path)] == ["site_a", "site_b"]
    pooled = pooled_dataset(tmp_path, cfg)
    assert len(pooled) == 3
    assert [(pooled[i].site, pooled[i].subject_id) for i in range(3)] == [("site_a", "x"), ("site_b", "x"), ("site_b", "y")]
    with pytest.raises(CohortError, match="holds no site folder"):
        list_sites(tmp_path / "not_a_site")


# --------------------------------------------------------------------------- collate + loader


def test_collate_stacks_each_organ_over_its_subjects_only():
    organs = OrganSet()
    subs = [
        Subject("a", {"heart": torch.full((1, 4, 4), 1.0)}, {"dm": 1.0}, "s"),
        Subject("b", {"brain": torch.full((1, 2, 2, 2), 2.0), "heart": torch.full((1, 4, 4), 3.0)}, {"dm": 0.0}, "s"),
        Subject("c", {"brain": torch.full((1, 2, 2, 2), 4.0)}, {}, "t"),
    ]
    b = collate_subjects(subs, organs, ["dm", "ht"])
    assert b.index["heart"].tolist() == [0, 1] and b.index["brain"].tolist() == [1, 2]
    assert b.images["heart"][:, 0, 0, 0].tolist() == [1.0, 3.0]
    assert b.images["brain"][:, 0, 0, 0, 0].tolist() == [2.0, 4.0]
    assert set(b.images) == {"heart", "brain"}  # no fake organs
    expected = torch.zeros(3, len(organs), dtype=torch.bool)
    expected[[0, 1], organs.index("heart")] = True
    expected[[1, 2], organs.index("brain")] = True
    assert torch.equal(b.present, expected)
    assert b.labels[:, 0].tolist()[:2] == [1.0, 0.0] and torch.isnan(b.labels[2, 0]) and torch.isnan(b.labels[:, 1]).all()
    assert b.sites == ["s", "s", "t"] and b.label_names == ("dm", "ht")
    with pytest.raises(ValueError, match="subject 'z'.*unknown organ"):
        collate_subjects([Subject("z", {"lung": torch.zeros(1, 4, 4)})], organs, [])


def test_loader_covers_every_subject_once_and_is_seeded(tmp_path):
    cfg = tiny_config(["data.batch_size=3"])
    make_site(tmp_path / "site_a", cfg, {f"s{i}": ["heart"] if i % 2 else ["brain", "heart"] for i in range(7)})
    ds = SiteDataset(tmp_path / "site_a", cfg)
    order = lambda seed: [s for b in make_loader(ds, cfg, shuffle=True, seed=seed) for s in b.subject_ids]  # noqa: E731
    assert sorted(order(0)) == sorted(ds.subject_ids)
    assert order(0) == order(0) and order(0) != order(1)
    batches = list(make_loader(ds, cfg, shuffle=False))
    assert [b.size for b in batches] == [3, 3, 1]
    assert batches[0].images["brain"].shape == (2, 1, 8, 8, 8) and batches[0].index["brain"].tolist() == [0, 2]
