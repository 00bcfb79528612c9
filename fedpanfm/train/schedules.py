"""Step-indexed training schedules: stateless functions of the global step.

Being pure functions of ``step`` lets a federated site continue every schedule across rounds by
continuing its step counter (``LocalTrainer.schedule_state``). Values past ``total`` stay at the
end value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpanfm.config import DexConfig, ExperimentConfig, TrainConfig


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step >= ``total``).

    Args:
        start: value at step 0.
        end: value at step ``total`` and after.
        step: the current step (negative steps count as 0).
        total: steps the decay takes; 0 means the schedule is already at ``end``.
    """
    if total < 0:
        raise ValueError(f"cosine schedule: total = {total} must be >= 0")
    if total == 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def linear_warmup(start: float, end: float, warmup: int, step: int) -> float:
    """Linear ramp from ``start`` (step 0) to ``end`` (step >= ``warmup``); ``warmup`` 0 gives ``end``."""
    if warmup < 0:
        raise ValueError(f"linear warm-up: warmup = {warmup} must be >= 0")
    if warmup == 0:
        return end
    t = min(max(step, 0), warmup) / warmup
    return start + (end - start) * t


def warmup_cosine(base: float, final: float, warmup: int, step: int, total: int) -> float:
    """Linear warm-up 0 -> ``base`` over ``warmup`` steps, then cosine ``base`` -> ``final`` at ``total``.

    Args:
        base: the peak value reached at the end of warm-up.
        final: the value at ``total`` and after.
        warmup: warm-up steps (DINO convention: warm up from 0).
        step: the current step.
        total: the whole schedule's length in steps (warm-up included).
    """
    if warmup > total:
        raise ValueError(f"warmup_cosine: warmup = {warmup} exceeds total = {total}")
    if step < warmup:
        return linear_warmup(0.0, base, warmup, step)
    return cosine(base, final, step - warmup, total - warmup)


def sqrt_batch_lr(lr: float, batch: int, reference_batch: int) -> float:
    """The square-root batch rule (DINOv2): ``lr * sqrt(batch / reference_batch)``.

    Args:
        lr: the peak learning rate at ``reference_batch``.
        batch: the effective batch (micro-batch x gradient-accumulation steps).
        reference_batch: the batch ``lr`` is given for (``train.lr_reference_batch``).
    """
    if batch < 1 or reference_batch < 1:
        raise ValueError(f"sqrt_batch_lr: batch = {batch} and reference_batch = {reference_batch} must be >= 1")
    return lr * math.sqrt(batch / reference_batch)


@dataclass
class Schedules:
    """All per-step hyper-parameters of local training.

    Args:
        train: ``cfg.train`` (lr, weight decay, teacher momentum / temperature, warm-up fractions).
        dex: ``cfg.model.dex`` (router noise, group-EMA momentum).
        total_steps: the whole run's optimiser steps (all rounds x local epochs x batches).
        effective_batch: subjects per optimiser step, for the square-root lr rule; None takes
            ``train.lr_reference_batch`` (``train.lr`` unscaled). :meth:`for_config` fills it in.
    """

    train: TrainConfig
    dex: DexConfig
    total_steps: int
    effective_batch: int | None = None

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"Schedules: total_steps = {self.total_steps} must be >= 1")
        self.lr_warmup = int(round(self.train.warmup_fraction * self.total_steps))
        self.temp_warmup = int(round(self.train.teacher_temp_warmup_fraction * self.total_steps))
        batch = self.train.lr_reference_batch if self.effective_batch is None else self.effective_batch
        self.peak_lr = sqrt_batch_lr(self.train.lr, batch, self.train.lr_reference_batch)

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, total_steps: int) -> "Schedules":
        """The schedules of ``cfg``'s trainer: effective batch = ``data.batch_size`` x
        ``deepspeed.gradient_accumulation_steps``."""
        batch = cfg.data.batch_size * cfg.deepspeed.gradient_accumulation_steps
        return cls(cfg.train, cfg.model.dex, total_steps, batch)

    def lr(self, step: int) -> float:
        return warmup_cosine(self.peak_lr, self.train.min_lr, self.lr_warmup, step, self.total_steps)

    def weight_decay(self, step: int) -> float:
        return cosine(self.train.weight_decay, self.train.weight_decay_end, step, self.total_steps)

    def teacher_momentum(self, step: int) -> float:
        return cosine(self.train.teacher_momentum_start, self.train.teacher_momentum_end, step, self.total_steps)

    def teacher_temp(self, step: int) -> float:
        return linear_warmup(self.train.teacher_temp_start, self.train.teacher_temp_end, self.temp_warmup, step)

    def noise_std(self, step: int) -> float:
        return cosine(self.dex.noise_std, 0.0, step, self.total_steps)

    def gema_momentum(self, step: int) -> float:
        return cosine(self.dex.gema_momentum_start, self.dex.gema_momentum_end, step, self.total_steps)

    def at(self, step: int) -> dict[str, float]:
        """Every schedule at ``step``: keys lr, weight_decay, teacher_momentum, teacher_temp,
        noise_std, gema_momentum (``PanFMSSL.forward`` reads teacher_temp and noise_std)."""
        return {
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "teacher_momentum": self.teacher_momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "noise_std": self.noise_std(step),
            "gema_momentum": self.gema_momentum(step),
        }
