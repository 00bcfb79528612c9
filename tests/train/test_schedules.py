"""Schedules at step 0 / middle / end against their formulas."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_config

from fedpanfm.train.schedules import Schedules, cosine, linear_warmup, sqrt_batch_lr, warmup_cosine


def test_cosine_linear_and_warmup_cosine_formulas() -> None:
    assert cosine(1.0, 0.0, 0, 10) == pytest.approx(1.0)
    assert cosine(1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert cosine(1.0, 0.0, 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert cosine(1.0, 0.0, 10, 10) == pytest.approx(0.0)
    assert cosine(1.0, 0.0, 99, 10) == pytest.approx(0.0)
    assert linear_warmup(0.04, 0.07, 10, 0) == pytest.approx(0.04)
    assert linear_warmup(0.04, 0.07, 10, 5) == pytest.approx(0.055)
    assert linear_warmup(0.04, 0.07, 10, 50) == pytest.approx(0.07)
    assert linear_warmup(0.04, 0.07, 0, 0) == pytest.approx(0.07)
    assert warmup_cosine(1.0, 0.1, 4, 0, 14) == pytest.approx(0.0)
    assert warmup_cosine(1.0, 0.1, 4, 2, 14) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1, 4, 4, 14) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 0.1, 4, 9, 14) == pytest.approx(0.55)
    assert warmup_cosine(1.0, 0.1, 4, 14, 14) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(1.0, 0.1, 20, 0, 10)


def test_schedules_object_start_middle_end() -> None:
    cfg = tiny_config()
    s = Schedules(cfg.train, cfg.model.dex, total_steps=100)
    t, d = cfg.train, cfg.model.dex
    start, mid, end = s.at(0), s.at(50), s.at(100)
    assert start["lr"] == 0.0 and end["lr"] == pytest.approx(t.min_lr)
    assert s.lr(10) == pytest.approx(t.lr)  # end of 10 % warm-up
    assert mid["lr"] == pytest.approx(t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * 40 / 90)))
    assert start["teacher_momentum"] == pytest.approx(0.996) and end["teacher_momentum"] == pytest.approx(1.0)
    assert mid["teacher_momentum"] == pytest.approx(0.998)
    assert start["teacher_temp"] == pytest.approx(0.04) and s.teacher_temp(15) == pytest.approx(0.055)
    assert mid["teacher_temp"] == pytest.approx(0.07) and end["teacher_temp"] == pytest.approx(0.07)
    assert start["noise_std"] == pytest.approx(d.noise_std) and mid["noise_std"] == pytest.approx(d.noise_std / 2)
    assert end["noise_std"] == pytest.approx(0.0)
    assert start["gema_momentum"] == pytest.approx(0.99) and mid["gema_momentum"] == pytest.approx(0.9945)
    assert end["gema_momentum"] == pytest.approx(0.999)
    assert start["weight_decay"] == pytest.approx(0.04) and end["weight_decay"] == pytest.approx(0.4)
    assert mid["weight_decay"] == pytest.approx(0.22)
    # stateless: a schedule continued in a later round gives the same value
    assert Schedules(cfg.train, cfg.model.dex, 100).at(37) == s.at(37)


def test_square_root_batch_rule_with_warmup() -> None:
    cfg = tiny_config(["train.lr=0.0005", "train.lr_reference_batch=16", "data.batch_size=64",
                       "deepspeed.gradient_accumulation_steps=2"])
    s = Schedules.for_config(cfg, total_steps=100)
    peak = 0.0005 * math.sqrt(128 / 16)  # effective batch 64 x 2 accumulation steps
    assert s.peak_lr == pytest.approx(peak)
    assert s.lr(0) == 0.0 and s.lr(5) == pytest.approx(peak / 2) and s.lr(10) == pytest.approx(peak)
    assert s.lr(100) == pytest.approx(cfg.train.min_lr)
    assert sqrt_batch_lr(0.004, 1024, 1024) == pytest.approx(0.004)
    assert sqrt_batch_lr(0.004, 16, 1024) == pytest.approx(0.0005)  # DINOv2's base lr at our reference
    # without an effective batch the configured lr is the peak
    assert Schedules(cfg.train, cfg.model.dex, 100).peak_lr == pytest.approx(0.0005)
    with pytest.raises(ValueError, match="batch"):
        sqrt_batch_lr(0.1, 0, 16)
