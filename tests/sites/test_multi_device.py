"""Multi-device sites (issue 17 item 4): shards, device counts, a world-size-2 step over gloo on
CPU that reproduces the world-size-1 update with the study recipe's random draws and batch
statistics on, and a dead rank that fails the step cleanly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpanfm.config import ExperimentConfig
from fedpanfm.train.data_parallel import ShardedLoader, shard_bounds
from fedpanfm.train.engine import deepspeed_config
from sites.multi_device import RankFailed, fit_on_devices, site_devices
from tests.conftest import make_site, tiny_config


def test_shard_bounds_tile_the_batch_evenly() -> None:
    for n in range(0, 11):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        shard_bounds(4, 2, 2)


def _loader(n: int, batch: int, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loaders_reassemble_the_single_device_batches(world: int) -> None:
    # 7 subjects, batch 4: batches of 4 and 3 per epoch; with 3 ranks a 3-batch still has one each,
    # and over two epochs the reshuffle must match too.
    single = _loader(7, 4, seed=5)
    reference = [b[0].tolist() for _ in range(2) for b in single]
    ranks = [ShardedLoader(_loader(7, 4, seed=5), r, world) for r in range(world)]
    per_rank = [[(s.batch[0].tolist(), s.weight) for _ in range(2) for s in loader] for loader in ranks]
    assert all(len(p) == len(reference) == 4 for p in per_rank)
    for step, expected in enumerate(reference):
        parts = [per_rank[r][step] for r in range(world)]
        joined = [i for ids, w in parts if w > 0 for i in ids]
        assert joined == expected
        assert sum(w for _, w in parts) == pytest.approx(1.0)
        for ids, w in parts:
            assert w == pytest.approx(len(ids) / len(expected)) or w == 0.0
    assert len(ranks[0]) == 2


def test_a_rank_without_subjects_gets_a_weightless_stand_in() -> None:
    shards = [next(iter(ShardedLoader(_loader(1, 4, seed=0), r, 2))) for r in range(2)]
    assert shards[0].weight == 0.0 and shards[1].weight == 1.0
    assert shards[0].batch[0].tolist() == shards[1].batch[0].tolist()  # the batch's first subject stands in


def test_site_devices_reads_the_config_and_the_node_config() -> None:
    cfg = tiny_config(["train.devices_per_site=2"])  # data.batch_size 4
    assert site_devices(cfg, {}) == 2
    assert site_devices(cfg, {"train-devices": 4}) == 4
    assert site_devices(cfg, {"train-devices": "1"}) == 1
    with pytest.raises(ValueError, match="train-devices = 3: data.batch_size = 4 must be a multiple"):
        site_devices(cfg, {"train-devices": 3})
    with pytest.raises(ValueError, match="train-devices = 0"):
        site_devices(cfg, {"train-devices": 0})
    with pytest.raises(ValueError, match="train-devices = 'two'"):
        site_devices(cfg, {"train-devices": "two"})
    # A CUDA site asking for more GPUs than it sees (here: CUDA mocked in, with no device).
    with mock.patch("fedpanfm.train.distributed.pick_device", return_value=torch.device("cuda", 0)), \
            mock.patch("torch.cuda.device_count", return_value=1):
        with pytest.raises(ValueError, match="train-devices = 2, but this process sees 1 CUDA device"):
            site_devices(cfg, {"train-devices": 2})


def test_deepspeed_micro_batch_is_the_site_batch_split_across_devices() -> None:
    cfg = tiny_config()
    assert deepspeed_config(cfg)["train_micro_batch_size_per_gpu"] == 4
    assert deepspeed_config(cfg, 2)["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ValueError, match="data.batch_size = 4 must split evenly across the site's 3 devices"):
        deepspeed_config(cfg, 3)


# ---------------------------------------------------------------------- world size 2 over gloo

#: The study recipe's training settings (configs/study.yaml) on the tiny model: organ-subset local
#: views (default 2), quarter turns and intensity augmentation, SGM organ masks and patch masks,
#: Sinkhorn-Knopp targets at teacher temperature 0.01, DEX router noise and load balance, the organ
#: contrast (its keys gathered across the ranks with gradient). Every
#: random draw and batch statistic of the step is in play: world size 2 must still reproduce
#: world size 1 to round-off (fedpanfm/global_batch.py).
RECIPE = ["train.augment.ranges.rotate_deg=0", "train.augment.ranges.translate=0", "train.augment.ranges.scale=[1.0,1.0]",
          "train.augment.ranges.noise_std=0", "train.augment.ranges.quarter_turns=true",
          "train.centering=sinkhorn_knopp", "train.teacher_temp_start=0.01", "train.teacher_temp_end=0.01",
          "train.lr=0.002", "train.warmup_fraction=0", "train.epochs=2", "train.cpu_threads=1", "data.val_fraction=0",
          "train.loss.organ_contrast=3.0"]
#: Subjects with different organs: unequal token counts per subject and per rank.
ORGAN_SETS = [["brain", "heart", "liver"], ["heart", "liver"], ["brain", "heart", "liver"], ["brain", "heart"],
              ["heart"], ["brain", "liver"], ["brain", "heart", "liver"]]
#: Ratios of sums over the batch (not means over subjects): a rank's value is its own ratio.
RATIO_METRICS = ("mask/organ_ratio", "mask/token_ratio", "views/local_organ_ratio")


def _site(tmp_path: Path, cfg: ExperimentConfig):
    from fedpanfm.data.dataset import open_site_dataset
    from sites.runtime import SiteRuntime

    site_dir = tmp_path / "site_a"
    # 7 subjects, batch 4: per epoch a batch of 4 (2 + 2 subjects per rank) and one of 3 (1 + 2:
    # unequal shares, so the loss and statistics weights are exercised).
    make_site(site_dir, cfg, {f"s{k}": organs for k, organs in enumerate(ORGAN_SETS)})
    dataset = open_site_dataset(site_dir, cfg)
    return SiteRuntime(cfg=cfg, name="site_a", site_dir=site_dir, train_ids=list(dataset.subject_ids), val_ids=[],
                       dataset=dataset)


def _single_device(cfg: ExperimentConfig, site, state, position, seed: int, saliency):
    from fedpanfm.train.engine import LocalTrainer

    trainer = LocalTrainer(cfg)
    trainer.load_state(state)
    trainer.reset_optimizer()
    trainer.set_schedule_state(position)
    torch.manual_seed(seed)
    result = trainer.fit(site.loader("train", round_seed=1), cfg.train.epochs, position["total_steps"],
                         global_saliency=saliency)
    return result, trainer.export_state(), trainer.schedule_state()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_world_size_2_reproduces_the_single_device_update(tmp_path: Path, zero_stage: int) -> None:
    from tests.conftest import global_model_state

    cfg = tiny_config(RECIPE + [f"deepspeed.zero_stage={zero_stage}"])
    site = _site(tmp_path, cfg)
    state = global_model_state(cfg, seed=3)
    position = {"step": 0, "total_steps": 8}
    saliency = torch.full((len(cfg.data.organ_set()),), float("nan"))
    seed = 1234

    t0 = time.perf_counter()
    ref, ref_state, ref_schedule = _single_device(cfg, site, state, position, seed, saliency)
    t1 = time.perf_counter()
    dp = fit_on_devices(cfg, site, state, position, round_seed=1, seed=seed, global_saliency=saliency, devices=2,
                        timeout_s=300)
    t2 = time.perf_counter()
    print(f"world size 1: {t1 - t0:.1f} s; world size 2 (2 processes, incl. start): {t2 - t1:.1f} s")

    assert dp.schedule == ref_schedule == {"step": 4, "total_steps": 8}
    assert dp.result.steps == ref.steps == 4 and dp.result.subjects == ref.subjects == 7
    assert torch.equal(dp.result.organ_subjects, ref.organ_subjects)
    # The step moved the weights well beyond the tolerance, so agreeing means something.
    moved = max((ref_state[k] - state[k]).abs().max().item() for k in state if k.startswith("student."))
    assert moved > 1e-3
    assert dp.state.keys() == ref_state.keys()
    worst = {k: (dp.state[k].double() - ref_state[k].double()).abs().max().item()
             for k in ref_state if ref_state[k].is_floating_point()}
    key = max(worst, key=worst.__getitem__)
    print(f"largest |world 2 - world 1| = {worst[key]:.2e} at {key}; weights moved up to {moved:.2e}")
    # Tolerance: float32 round-off of a gradient averaged over 2 ranks instead of summed in one
    # batch (and of Sinkhorn-Knopp sums taken per rank, then combined), carried through 4 AdamW
    # steps (whose first steps normalise by |g|) and the EMAs. A draw made per rank instead of
    # per subject (other masks, subsets, turns or noise) moves weights by ~1e-3 (docs/scale-out.md).
    assert worst[key] < 1e-5, f"{key} differs by {worst[key]:.2e}"
    for k in ("dino_loss.center", "ibot_loss.center", "masker.local_saliency", "masker.local_count",
              "masker.stat_masked"):
        if k in ref_state:
            assert torch.allclose(dp.state[k], ref_state[k], atol=1e-6), k
    assert torch.allclose(dp.result.gate_mass, ref.gate_mass, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dp.result.saliency.nan_to_num(-1), ref.saliency.nan_to_num(-1), atol=1e-6)
    assert dp.result.metrics.keys() == ref.metrics.keys()
    for k, v in ref.metrics.items():
        if k not in RATIO_METRICS:
            assert dp.result.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # The masks themselves agree: the masking counters are exact (whole organs masked, per organ).
    assert {k: v for k, v in dp.result.metrics.items() if k.startswith("mask_rate/")} == \
        {k: v for k, v in ref.metrics.items() if k.startswith("mask_rate/")}
    assert len(dp.result.history) == len(ref.history) == 4
    for a, b in zip(dp.result.history, ref.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(pid, 0): read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_dead_rank_fails_the_step_naming_it_and_stops_the_others(tmp_path: Path) -> None:
    cfg = tiny_config(RECIPE)
    site = _site(tmp_path, cfg)
    pids: list[int] = []

    def kill_rank_1(started: list[int]) -> None:
        pids.extend(started)
        os.kill(started[1], signal.SIGKILL)

    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fedpanfm-dp-*"))
    with pytest.raises(RankFailed, match=r"site site_a: data-parallel rank 1 of 2 was killed by SIGKILL"):
        fit_on_devices(cfg, site, {}, {"step": 0, "total_steps": 4}, round_seed=1, seed=0,
                       global_saliency=torch.zeros(len(cfg.data.organ_set())), devices=2, timeout_s=120,
                       on_start=kill_rank_1)
    assert len(pids) == 2
    assert not any(_alive(p) for p in pids), "a rank outlived the failed step"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fedpanfm-dp-*")) <= before, "the job folder was left"


def test_a_rank_error_is_reported_with_its_log(tmp_path: Path) -> None:
    # The site's manifest vanishes between the call and the ranks' start: each rank fails to
    # open the site, and the error names a rank and quotes its log.
    cfg = tiny_config(RECIPE)
    site = _site(tmp_path, cfg)
    (site.site_dir / "manifest.csv").unlink()
    with pytest.raises(RankFailed, match=r"(?s)data-parallel rank \d of 2 exited with status 1.*manifest"):
        fit_on_devices(cfg, site, {}, {"step": 0, "total_steps": 4}, round_seed=1, seed=0,
                       global_saliency=torch.zeros(len(cfg.data.organ_set())), devices=2, timeout_s=120)
