"""Training-step time: masking policies, DeepSpeed vs a plain PyTorch loop, achieved FLOP/s.

``python -m bench.step_time [--config FILE] [--set KEY=VALUE ...] [--steps N] [--repeats R]``

Prints (does not assert):
1. step time with ``train.masking.policy`` sgm / random / none (target: sgm within 3 % of none:
   SGM reuses the teacher's attention, so it should cost next to nothing);
2. the DeepSpeed engine step vs the same step in a plain PyTorch loop with torch.optim.AdamW
   (target: within 5 %);
3. achieved training FLOP/s (FlopCounterMode over one forward + backward) against this machine's
   fp32 matmul peak, measured in the same run.

Batches come from a synthetic cohort written to a temporary folder and are collated before
timing, so data loading is not timed. Policies / loops are timed in interleaved rounds and the
median is reported, which keeps a busy shared machine's drift out of the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.machine import matmul_peak
from bench.table import Row, check
from fedpanfm.config import ExperimentConfig, load_config
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.collate import make_loader
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.train.engine import LocalTrainer, param_groups
from fedpanfm.train.schedules import Schedules

# A small but not trivial model: big enough that the step is compute-bound, small enough for 2 cores.
DEFAULT_SETS = ["synth.sites=1", "synth.subjects=32", "data.batch_size=8", "train.progress=false"]


def make_batches(cfg: ExperimentConfig, n: int) -> list[SubjectBatch]:
    """``n`` collated batches of a freshly generated synthetic cohort (first site)."""
    from fedpanfm.data.dataset import SiteDataset

    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        sites = generate_cohort(Path(tmp) / "cohort", cfg)
        ds = SiteDataset(sites[0], cfg)
        batches = list(make_loader(ds, cfg, shuffle=False, seed=cfg.seed))
    full = [b for b in batches if b.size == cfg.data.batch_size] or batches
    return [full[i % len(full)] for i in range(n)]


class PlainLoop:
    """The trainer's step without DeepSpeed: torch.optim.AdamW, clipping, teacher / director EMA.

    Args:
        cfg: the experiment config (same model and schedules as the DeepSpeed trainer).
        total_steps: the schedules' horizon.
    """

    def __init__(self, cfg: ExperimentConfig, total_steps: int) -> None:
        from fedpanfm.model.meta_arch import PanFMSSL

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model = PanFMSSL(cfg)
        self.opt = torch.optim.AdamW(param_groups(self.model), lr=cfg.train.lr)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sched = Schedules(cfg.train, cfg.model.dex, total_steps)
        self.step = 0

    def train_step(self, batch: SubjectBatch) -> None:
        s = self.sched.at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = s["lr"]
            g["weight_decay"] = s["weight_decay"] * g["wd_scale"]
        out = self.model(batch, {"teacher_temp": s["teacher_temp"], "noise_std": s["noise_std"]})
        out.loss.backward()
        if self.cfg.deepspeed.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.deepspeed.gradient_clipping)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.update_teacher(s["teacher_momentum"])
            self.model.update_directors(s["gema_momentum"])
        self.step += 1


    def run(self, batches: list[SubjectBatch]) -> None:
        for b in batches:
            self.train_step(b)


Runner = Callable[[list[SubjectBatch]], None]


def time_steps(run: Runner, batches: list[SubjectBatch]) -> float:
    """Mean seconds per step of ``run(batches)`` (one step per batch)."""
    t = time.perf_counter()
    run(batches)
    return (time.perf_counter() - t) / len(batches)


def interleaved(fns: dict[str, Runner], batches: list[SubjectBatch], repeats: int) -> dict[str, float]:
    """Median seconds per step of each runner, timed in alternating rounds (after one warm-up)."""
    for fn in fns.values():
        time_steps(fn, batches[:2])
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        # Rotate the order each round so no runner always goes first (after another's cache use).
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(time_steps(fns[name], batches))
    return {k: statistics.median(v) for k, v in samples.items()}


def deepspeed_run(trainer: LocalTrainer, total_steps: int) -> Runner:
    """One ``LocalTrainer.fit`` epoch over the given batches."""
    return lambda batches: trainer.fit(batches, epochs=1, total_steps=total_steps)


def training_flops(cfg: ExperimentConfig, batch: SubjectBatch) -> int:
    """FLOPs of one forward + backward of PanFMSSL on ``batch`` (matmuls, convolutions, attention)."""
    from fedpanfm.model.meta_arch import PanFMSSL

    torch.manual_seed(cfg.seed)
    model = PanFMSSL(cfg)
    sched = Schedules(cfg.train, cfg.model.dex, 10).at(0)
    with FlopCounterMode(display=False) as counter:
        out = model(batch, {"teacher_temp": sched["teacher_temp"], "noise_std": sched["noise_std"]})
        out.loss.backward()
    return int(counter.get_total_flops())


def measure(quick: bool, overrides: list[str] | None = None, config: str | None = None) -> list[Row]:
    """Items 1-3 as table rows: DeepSpeed / plain, SGM / no masking, FLOP/s / matmul peak.

    Args:
        quick: fewer steps and rounds.
        overrides: ``KEY=VALUE`` on top of :data:`DEFAULT_SETS`.
        config: experiment YAML (None: the built-in defaults).
    """
    steps, repeats = (4, 3) if quick else (8, 5)
    base = DEFAULT_SETS + list(overrides or [])
    cfg = load_config(config, base)
    batches = make_batches(cfg, steps)
    total = 1000
    trainers = {pol: LocalTrainer(load_config(config, base + [f"train.masking.policy={pol}"])) for pol in ("sgm", "none")}
    plain = PlainLoop(trainers["sgm"].cfg, total)
    times = interleaved({**{f"deepspeed/{pol}": deepspeed_run(t, total) for pol, t in trainers.items()},
                         "plain/sgm": plain.run}, batches, repeats)
    ds, pl, none = times["deepspeed/sgm"], times["plain/sgm"], times["deepspeed/none"]
    flops = training_flops(trainers["sgm"].cfg, batches[0])
    bf16 = cfg.deepspeed.bf16
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    prec = "bf16" if bf16 else "fp32"
    size = f"dim {cfg.model.dim}, depth {cfg.model.depth}, batch {cfg.data.batch_size}"
    return [
        Row("1 deepspeed step / plain torch", ds / pl, "<= 1.05", check(ds / pl, "<=", 1.05),
            f"{ds * 1e3:.1f} ms vs {pl * 1e3:.1f} ms per step ({size})", {"deepspeed_s": ds, "plain_s": pl}),
        Row("2 step SGM / masking off", ds / none, "<= 1.03", check(ds / none, "<=", 1.03),
            f"{ds * 1e3:.1f} ms vs {none * 1e3:.1f} ms per step", {"sgm_s": ds, "none_s": none}),
        Row(f"3 train FLOP/s / {prec} matmul peak", flops / ds / peak, ">= 0.35", check(flops / ds / peak, ">=", 0.35),
            f"{flops / ds / 1e9:.1f} GFLOP/s ({flops / 1e9:.2f} GFLOP/step) / {peak / 1e9:.1f} GFLOP/s ({size})",
            {"flops_per_step": flops, "step_s": ds, "peak": peak, "precision": prec}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    args = p.parse_args(argv)
    base = DEFAULT_SETS + args.overrides
    cfg = load_config(args.config, base)
    batches = make_batches(cfg, args.steps)
    total = 1000
    print(f"model dim {cfg.model.dim} depth {cfg.model.depth} experts {cfg.model.dex.experts}, "
          f"batch {cfg.data.batch_size}, {args.steps} steps x {args.repeats} rounds, torch threads {torch.get_num_threads()}")

    trainers = {pol: LocalTrainer(load_config(args.config, base + [f"train.masking.policy={pol}"]))
                for pol in ("sgm", "random", "none")}
    plain = PlainLoop(trainers["sgm"].cfg, total)
    times = interleaved(
        {**{f"deepspeed/{pol}": deepspeed_run(t, total) for pol, t in trainers.items()}, "plain/sgm": plain.run},
        batches, args.repeats,
    )
    none = times["deepspeed/none"]
    print("\n1. masking policy (DeepSpeed step, median s/step):")
    for pol in ("sgm", "random", "none"):
        t = times[f"deepspeed/{pol}"]
        print(f"   {pol:6s} {t * 1e3:8.1f} ms   {100 * (t / none - 1):+6.1f} % vs none")
    ds, pl = times["deepspeed/sgm"], times["plain/sgm"]
    print("\n2. DeepSpeed engine vs plain PyTorch loop (policy sgm):")
    print(f"   deepspeed {ds * 1e3:8.1f} ms   plain {pl * 1e3:8.1f} ms   overhead {100 * (ds / pl - 1):+6.1f} %")

    flops = training_flops(trainers["sgm"].cfg, batches[0])
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    achieved = flops / ds
    print("\n3. FLOP/s (FlopCounterMode, forward + backward of one step):")
    print(f"   {flops / 1e9:.3f} GFLOP per step -> {achieved / 1e9:.2f} GFLOP/s achieved")
    print(f"   measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s "
          f"-> {100 * achieved / peak32:.1f} % of the fp32 peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
