"""LocalTrainer: the real PanFMSSL in one DeepSpeed engine, on a tiny synthetic cohort (CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.collate import make_loader
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.train.engine import LocalTrainer, clear_trainer_cache, deepspeed_config, get_trainer, trainer_key
from fedpanfm.train.pretrain import pooled_split
from fedpanfm.train.schedules import Schedules

# Fast-moving settings so a few steps show learning: no warm-ups, a larger lr.
OVERRIDES = ["train.lr=0.002", "train.warmup_fraction=0", "train.teacher_temp_warmup_fraction=0"]


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return tiny_config(OVERRIDES)


@pytest.fixture(scope="module")
def init_calls() -> Iterator[list[int]]:
    """Counts deepspeed.initialize calls made while this module's tests run."""
    calls: list[int] = []
    real = deepspeed.initialize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(deepspeed, "initialize", counting)
    clear_trainer_cache()
    yield calls
    mp.undo()
    clear_trainer_cache()


@pytest.fixture(scope="module")
def trainer(cfg: ExperimentConfig, init_calls: list[int]) -> LocalTrainer:
    return get_trainer(cfg)


@pytest.fixture(scope="module")
def initial_state(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return trainer.export_state()


@pytest.fixture(scope="module")
def train_set(cfg: ExperimentConfig, tmp_path_factory: pytest.TempPathFactory):
    cohort = tmp_path_factory.mktemp("cohort")
    generate_cohort(cohort, cfg)
    train, _ = pooled_split(cohort, cfg)
    return train


@pytest.fixture(scope="module")
def loader(cfg: ExperimentConfig, train_set):
    return make_loader(train_set, cfg, shuffle=True, seed=0)


@pytest.fixture(scope="module")
def eval_loader(cfg: ExperimentConfig, train_set):
    """Unshuffled: evaluation is comparable across calls only over the same batches."""
    return make_loader(train_set, cfg, shuffle=False, seed=0)


def _fresh(trainer: LocalTrainer, state: dict[str, torch.Tensor]) -> LocalTrainer:
    """The cached trainer back at the initial weights, step 0 and empty optimizer moments."""
    trainer.load_state(state)
    trainer.set_schedule_state({"step": 0})
    trainer.reset_optimizer()
    return trainer


def test_short_run_lowers_loss(trainer: LocalTrainer, initial_state, loader, eval_loader) -> None:
    t = _fresh(trainer, initial_state)
    before = t.evaluate(eval_loader)
    result = t.fit(loader, epochs=2, total_steps=4 * len(loader))
    after = t.evaluate(eval_loader)
    assert result.steps == 2 * len(loader)
    assert after["loss"] < before["loss"]
    # the masked-token (iBOT) prediction is what a few steps learn first
    assert after["loss/ibot"] < 0.8 * before["loss/ibot"]


def test_engine_built_once_across_calls(cfg, trainer: LocalTrainer, initial_state, loader, init_calls) -> None:
    _fresh(trainer, initial_state)
    for _ in range(3):
        assert get_trainer(cfg) is trainer
        trainer.reset_optimizer()
        trainer.fit(loader, epochs=1, total_steps=10)
    # a config that differs only outside model/engine/organs/train reuses the same trainer
    other = tiny_config(OVERRIDES + ["cohort=elsewhere", "federation.rounds=7", "logging.run_dir=x"])
    assert get_trainer(other) is trainer
    assert len(init_calls) == 1
    assert trainer_key(tiny_config(OVERRIDES + ["model.depth=3"])) != trainer_key(cfg)


def test_fit_result_counts(cfg, trainer: LocalTrainer, initial_state) -> None:
    t = _fresh(trainer, initial_state)
    sets = [["brain", "heart"], ["heart", "adipose", "liver"], ["adipose", "kidney"], ["heart"]]
    batches = [make_batch(cfg, sets, seed=0), make_batch(cfg, sets[:2], seed=1)]
    batches[1].subject_ids = ["s0", "s9"]  # s0 again (same organs) plus a new subject
    result = t.fit(batches, epochs=2, total_steps=20)
    n_organs = len(cfg.data.organ_set())
    assert result.steps == 4 and result.subjects == 5
    # distinct subjects per organ: brain {s0}, heart {s0,s1,s3,s9}, adipose {s1,s2,s9}, liver {s1,s9}, kidney {s2}
    assert result.organ_subjects.tolist() == [1, 4, 3, 2, 1, 0, 0]
    assert result.gate_mass.shape == (cfg.model.depth, cfg.model.dex.experts)
    assert result.gate_mass.dtype == torch.float64
    # gates are renormalised over the top-k: each image routes mass 1 per layer
    images = 2 * (4 + 2)
    assert torch.allclose(result.gate_mass.sum(dim=1), torch.full((cfg.model.depth,), float(images), dtype=torch.float64))
    assert result.saliency.shape == (n_organs,)
    assert torch.isnan(result.saliency[5:]).all() and torch.isfinite(result.saliency[:5]).all()
    for key in ("loss", "loss/dino", "loss/ibot", "saliency/heart", "mask_rate/heart"):
        assert key in result.metrics
    assert len(result.history) == 4


def test_export_load_round_trip_is_exact(trainer: LocalTrainer, initial_state, loader) -> None:
    t = _fresh(trainer, initial_state)
    t.fit(loader, epochs=1, total_steps=10)
    snap = t.export_state()
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in snap.values())
    assert all(v.dtype == torch.float32 for v in snap.values() if v.is_floating_point())
    assert {k.split(".")[0] for k in snap} == {"student", "teacher", "dino_loss", "ibot_loss", "masker"}
    t.fit(loader, epochs=1, total_steps=10)
    changed = t.export_state()
    assert not torch.equal(changed["student.encoder.norm.weight"], snap["student.encoder.norm.weight"])
    t.load_state(snap)
    again = t.export_state()
    assert again.keys() == snap.keys()
    assert all(torch.equal(again[k], snap[k]) for k in snap)
    # the exported tensors are copies: training does not change a snapshot already taken
    t.fit(loader, epochs=1, total_steps=10)
    assert all(torch.equal(again[k], snap[k]) for k in snap)


def test_schedules_continue_across_calls(cfg, trainer: LocalTrainer, initial_state, loader) -> None:
    t = _fresh(trainer, initial_state)
    total = 6 * len(loader)
    sched = Schedules.for_config(cfg, total)
    first = t.fit(loader, epochs=1, total_steps=total)
    second = t.fit(loader, epochs=2, total_steps=total)
    lrs = [h["schedule/lr"] for h in first.history + second.history]
    assert t.schedule_state() == {"step": 3 * len(loader), "total_steps": total}
    assert lrs == pytest.approx([sched.lr(s) for s in range(3 * len(loader))])
    assert lrs[-1] < lrs[0]  # cosine decay carried over the call boundary
    # the optimizer saw the last step's lr; the no-decay group (biases, norms) has no weight decay
    groups = t.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(sched.lr(3 * len(loader) - 1))
    assert groups[0]["weight_decay"] == pytest.approx(sched.weight_decay(3 * len(loader) - 1))
    assert cfg.train.weight_decay < groups[0]["weight_decay"] < cfg.train.weight_decay_end
    # the square-root batch rule: the tiny config's batch 4 against the reference 16 halves the lr
    assert sched.peak_lr == pytest.approx(cfg.train.lr * 0.5)
    assert groups[1]["weight_decay"] == 0.0
    # a site restoring its step resumes its schedule there
    t.set_schedule_state({"step": 5})
    resumed = t.fit(loader, epochs=1, total_steps=total)
    assert resumed.history[0]["schedule/teacher_momentum"] == pytest.approx(sched.teacher_momentum(5))
    with pytest.raises(ValueError, match="missing 'step'"):
        t.set_schedule_state({})


def test_last_layer_frozen_in_the_runs_first_epoch_then_moves(trainer: LocalTrainer, initial_state, loader) -> None:
    t = _fresh(trainer, initial_state)
    n = len(loader)
    assert t.freeze_last_layer_steps(loader) == n  # train.freeze_last_layer_epochs = 1
    key, mlp = "student.head.last_layer.weight", "student.head.mlp.0.weight"
    w0 = t.export_state()
    first = t.fit(loader, epochs=1, total_steps=4 * n)
    w1 = t.export_state()
    assert torch.equal(w1[key], w0[key])  # untouched: no gradient, no weight decay
    assert not torch.equal(w1[mlp], w0[mlp])  # while the rest of the head learns
    assert [h["schedule/last_layer_frozen"] for h in first.history] == [1.0] * n
    # a later call (a site's next round) continues the global step: the first epoch is over
    second = t.fit(loader, epochs=1, total_steps=4 * n)
    assert not torch.equal(t.export_state()[key], w1[key])
    assert [h["schedule/last_layer_frozen"] for h in second.history] == [0.0] * n
    # a site resuming at step 0 (a fresh run) freezes again
    t.set_schedule_state({"step": 0})
    assert t.fit(loader, epochs=1, total_steps=4 * n).history[0]["schedule/last_layer_frozen"] == 1.0


def test_evaluate_changes_nothing(trainer: LocalTrainer, initial_state, loader, eval_loader) -> None:
    t = _fresh(trainer, initial_state)
    t.fit(loader, epochs=1, total_steps=10)
    before = t.export_state()
    e1 = t.evaluate(eval_loader)
    e2 = t.evaluate(eval_loader)
    assert e1 == e2  # fixed mask generator: the same masks each time
    after = t.export_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_state_rejects_bad_input(trainer: LocalTrainer, initial_state) -> None:
    t = trainer
    bad = dict(initial_state)
    bad["student.encoder.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys: student.encoder.bogus"):
        t.load_state(bad)
    missing = dict(initial_state)
    key = "masker.local_saliency"
    del missing[key]
    with pytest.raises(ValueError, match=f"missing keys: .*{key}"):
        t.load_state(missing)
    t.load_state(missing, strict=False)  # partial loads are allowed when asked for
    shape = dict(initial_state)
    shape["student.encoder.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'student.encoder.norm.weight' has shape \(3,\)"):
        t.load_state(shape)
    with pytest.raises(ValueError, match="unexpected keys"):
        t.load_state({"nope": torch.zeros(1)}, strict=False)


def test_reset_optimizer_clears_moments(trainer: LocalTrainer, initial_state, loader) -> None:
    t = _fresh(trainer, initial_state)
    t.fit(loader, epochs=1, total_steps=10)
    base = t._base_optimizer()
    assert len(base.state) > 0 and all("exp_avg" in s for s in base.state.values())
    t.reset_optimizer()
    assert len(base.state) == 0


def test_bad_loader_and_config(cfg, trainer: LocalTrainer) -> None:
    with pytest.raises(ValueError, match="fit: the loader yielded no batch"):
        trainer.fit([], epochs=1, total_steps=10)
    with pytest.raises(TypeError, match="expected SubjectBatch"):
        trainer.fit([{"images": 1}], epochs=1, total_steps=10)
    with pytest.raises(ValueError, match="deepspeed.extra.bf16.enabled"):
        deepspeed_config(tiny_config(["deepspeed.extra={bf16: {enabled: true}}"]))
    with pytest.raises(ValueError, match="zero_stage = 3"):
        deepspeed_config(tiny_config(["deepspeed.zero_stage=3"]))
    conf = deepspeed_config(tiny_config(["deepspeed.extra={zero_optimization: {stage: 1}, steps_per_print: 5}"]))
    assert conf["zero_optimization"] == {"stage": 1} and conf["steps_per_print"] == 5
    assert conf["optimizer"]["params"]["torch_adam"] is True
    assert conf["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


def test_bf16_autocast_trains_fp32_weights(cfg, tmp_path: Path) -> None:
    bcfg = tiny_config(OVERRIDES + ["deepspeed.bf16=true"])
    t = LocalTrainer(bcfg)
    sets = [["brain", "heart"], ["adipose", "liver"], ["heart", "kidney"], ["adipose"]]
    batches: list[SubjectBatch] = [make_batch(bcfg, sets, seed=s) for s in range(2)]
    before = t.export_state()
    result = t.fit(batches, epochs=1, total_steps=4)
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    after = t.export_state()
    # the teacher moves by (1 - m) of the student's change: visible only because it stays fp32
    k = "teacher.encoder.norm.weight"
    assert not torch.equal(before[k], after[k])


def test_zero1_load_state_reaches_the_optimizer_copy() -> None:
    # ZeRO 1/2 keep their own fp32 weight partitions: a load that only wrote the module would be
    # undone by the next optimizer step. A step at lr 0 (warm-up step 0) must leave the loaded weights.
    zcfg = tiny_config(["deepspeed.zero_stage=1"])
    t = LocalTrainer(zcfg)
    sets = [["brain", "heart"], ["heart", "adipose", "liver"], ["adipose", "kidney"], ["heart"]]
    batches = [make_batch(zcfg, sets, seed=s) for s in range(2)]
    t.fit(batches, epochs=1, total_steps=10)
    snap = t.export_state()
    t.fit(batches, epochs=1, total_steps=10)
    t.load_state(snap)
    t.reset_optimizer()
    t.set_schedule_state({"step": 0})
    assert Schedules(zcfg.train, zcfg.model.dex, 10).lr(0) == 0.0
    t.fit(batches[:1], epochs=1, total_steps=10)
    after = t.export_state()
    k = "student.encoder.norm.weight"
    assert torch.equal(after[k], snap[k])
