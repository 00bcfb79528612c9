"""Training-step time: masking policies, DeepSpeed vs a plain PyTorch loop, achieved FLOP/s.

``python -m bench.step_time [--config FILE] [--set KEY=VALUE ...] [--steps N] [--repeats R]``

Prints (does not assert):
1. step time with ``train.masking.policy`` sgm / random / none (target: sgm within 3 % of none:
   SGM reuses the teacher's attention, so it should cost next to nothing);
2. the DeepSpeed engine step vs the same step in a plain PyTorch loop with torch.optim.AdamW
   (target: within 5 %);
3. achieved training FLOP/s (FlopCounterMode over one forward + backward) against this machine's
   matmul peak of the precision used (:func:`bench.machine.machine_peak`), measured in the same
   run, at the benchmark size :data:`BENCH_SIZE` on all cores (the target's row), and per core
   at the quickstart size.

Items 1-2 run their trainers with one torch thread (``train.cpu_threads=1``): on this shared
2-core machine two-thread steps were 7-10x slower under load (docs/performance.md).

Batches come from a synthetic cohort written to a temporary folder and are collated before
timing, so data loading is not timed. Policies / loops are timed in interleaved rounds (order
rotated) and medians are reported, which keeps a busy shared machine's drift out of the
comparison; items 1-2 compare process CPU seconds per step (wall clock in the detail), since on
a loaded machine a one-thread step's wall time mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.machine import default_threads, machine_peak, matmul_peak
from bench.table import Row, check
from fedpanfm.config import ExperimentConfig, load_config
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.collate import make_loader
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.train.distributed import autocast_dtype, pick_device
from fedpanfm.train.engine import LocalTrainer, param_groups
from fedpanfm.train.schedules import Schedules

# A small but not trivial model: big enough that the step is compute-bound, small enough for 2 cores.
DEFAULT_SETS = ["synth.sites=1", "synth.subjects=32", "data.batch_size=8", "train.progress=false",
                "train.cpu_threads=1"]
#: Item 3's benchmark model: ViT-Tiny-ish width, what a user pre-training a pan-organ FM would run.
BENCH_SIZE = ["model.dim=192", "model.depth=6", "model.heads=3", "data.batch_size=16"]


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
        # fused=True: the same optimiser kernel the DeepSpeed trainer is configured with.
        self.opt = torch.optim.AdamW(param_groups(self.model), lr=cfg.train.lr, fused=True)
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


@dataclass
class StepTimes:
    """Per-step seconds of one runner over the timed rounds.

    Args:
        wall: wall-clock seconds per step, one entry per round.
        cpu: this process's CPU seconds per step (all its threads), one entry per round.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def best_wall(self) -> float:
        return min(self.wall)


def time_steps(run: Runner, batches: list[SubjectBatch]) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of ``run(batches)`` (one step per batch)."""
    t, c = time.perf_counter(), time.process_time()
    run(batches)
    return (time.perf_counter() - t) / len(batches), (time.process_time() - c) / len(batches)


def interleaved(fns: dict[str, Runner], batches: list[SubjectBatch], repeats: int) -> dict[str, StepTimes]:
    """Each runner's per-step times, timed in alternating rounds (after one warm-up)."""
    for fn in fns.values():
        time_steps(fn, batches[:2])
    samples: dict[str, StepTimes] = {k: StepTimes() for k in fns}
    names = list(fns)
    for r in range(repeats):
        # Rotate the order each round so no runner always goes first (after another's cache use).
        for name in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu = time_steps(fns[name], batches)
            samples[name].wall.append(wall)
            samples[name].cpu.append(cpu)
    return samples


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


def flops_row(cfg: ExperimentConfig, times: StepTimes, batch: SubjectBatch, label: str, all_cores: bool) -> Row:
    """Item 3's row: FlopCounterMode FLOPs of one step against the matmul peak.

    Args:
        cfg: the trainer's config (model size, precision).
        times: the trainer's step times.
        batch: a batch of the timed ones (FLOPs are counted on it).
        label: which model size, for the row's name.
        all_cores: the trainer ran on every core: the ratio is the best-of step's wall-clock
            FLOP/s over the machine's best-of peak (all cores or one thread, whichever is
            higher), the issue's definition, with a target. Otherwise (a one-thread trainer)
            the row is informative: FLOPs per CPU-second of a step (median) over one-thread
            matmul FLOPs per CPU-second, i.e. one core's efficiency.
    """
    flops = training_flops(cfg, batch)
    dtype = autocast_dtype(cfg.deepspeed.bf16, pick_device(cfg.device)) or torch.float32
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    core_peak = matmul_peak(dtype, threads=1, cpu_time=True)
    wall_peak = machine_peak(dtype)
    size = f"dim {cfg.model.dim}, depth {cfg.model.depth}, batch {cfg.data.batch_size}"
    wall_ratio = flops / times.best_wall / wall_peak
    core_ratio = flops / times.median_cpu / core_peak
    wall = (f"{flops / times.best_wall / 1e9:.1f} GFLOP/s ({flops / 1e9:.2f} GFLOP/step, best step "
            f"{times.best_wall * 1e3:.0f} ms) / machine peak {wall_peak / 1e9:.1f}")
    core = (f"{flops / times.median_cpu / 1e9:.1f} GFLOP per CPU-s ({times.median_cpu * 1e3:.0f} CPU-ms/step) / "
            f"1-thread peak {core_peak / 1e9:.1f}")
    data = {"flops_per_step": flops, "step_cpu_s": times.median_cpu, "step_wall_best_s": times.best_wall,
            "step_wall_median_s": times.median_wall, "core_peak_cpu": core_peak, "machine_peak_wall": wall_peak,
            "wall_ratio": wall_ratio, "core_ratio": core_ratio, "precision": prec, "size": size,
            "threads": torch.get_num_threads()}
    name = f"3 train FLOP/s / {prec} matmul peak ({label})"
    if all_cores:
        return Row(name, wall_ratio, ">= 0.35", check(wall_ratio, ">=", 0.35),
                   f"{wall}; per core {core} = {core_ratio:.3f} ({size}, {torch.get_num_threads()} threads)", data)
    return Row(name + ", 1 thread, per core", core_ratio, "", None,
               f"{core}; wall {wall} = {wall_ratio:.3f} ({size})", data)


def measure(quick: bool, overrides: list[str] | None = None, config: str | None = None) -> list[Row]:
    """Items 1-3 as table rows: DeepSpeed / plain, SGM / no masking, FLOP/s / matmul peak.

    Args:
        quick: fewer steps and rounds.
        overrides: ``KEY=VALUE`` on top of :data:`DEFAULT_SETS`.
        config: experiment YAML (None: the built-in defaults).
    """
    steps, repeats = (4, 7) if quick else (8, 9)
    base = DEFAULT_SETS + list(overrides or [])
    cfg = load_config(config, base)
    batches = make_batches(cfg, steps)
    total = 1000
    trainers = {pol: LocalTrainer(load_config(config, base + [f"train.masking.policy={pol}"]))
                for pol in ("sgm", "random", "none")}
    plain = PlainLoop(trainers["sgm"].cfg, total)
    times = interleaved({**{f"deepspeed/{pol}": deepspeed_run(t, total) for pol, t in trainers.items()},
                         "plain/sgm": plain.run}, batches, repeats)
    # Items 1-2 compare CPU seconds per step (medians): the trainers run one torch thread, so a
    # step's CPU time is its cost, while its wall time on this shared machine mostly measures
    # how long other users' processes held the cores (wall medians are in the JSON and detail).
    cpu = {k: v.median_cpu for k, v in times.items()}
    wall = {k: v.median_wall for k, v in times.items()}
    ds, pl, none, rnd = cpu["deepspeed/sgm"], cpu["plain/sgm"], cpu["deepspeed/none"], cpu["deepspeed/random"]
    size = f"dim {cfg.model.dim}, depth {cfg.model.depth}, batch {cfg.data.batch_size}"
    rows = [
        Row("1 deepspeed step / plain torch", ds / pl, "<= 1.05", check(ds / pl, "<=", 1.05),
            f"CPU {ds * 1e3:.1f} ms vs {pl * 1e3:.1f} ms per step; wall {wall['deepspeed/sgm'] * 1e3:.1f} vs "
            f"{wall['plain/sgm'] * 1e3:.1f} ms ({size})", {"cpu_s": cpu, "wall_s": wall}),
        Row("2 step SGM / masking off", ds / none, "<= 1.03", check(ds / none, "<=", 1.03),
            f"CPU {ds * 1e3:.1f} ms vs {none * 1e3:.1f} ms per step; random organ masking {rnd * 1e3:.1f} ms "
            f"(SGM / random {ds / rnd:.3f}); wall {wall['deepspeed/sgm'] * 1e3:.1f} vs {wall['deepspeed/none'] * 1e3:.1f} ms",
            {"cpu_s": cpu, "wall_s": wall}),
        flops_row(trainers["sgm"].cfg, times["deepspeed/sgm"], batches[0], "quickstart size", all_cores=False),
    ]
    del trainers, plain
    # The benchmark size: the SGM trainer alone (its step time is what item 3 divides by), on
    # every core, as a site owning the machine would train.
    big = load_config(config, base + BENCH_SIZE + [f"train.cpu_threads={default_threads()}"])
    big_batches = make_batches(big, 2)
    trainer = LocalTrainer(big)
    big_t = interleaved({"deepspeed/sgm": deepspeed_run(trainer, total)}, big_batches, 3 if quick else 5)["deepspeed/sgm"]
    rows.append(flops_row(big, big_t, big_batches[0], "benchmark size", all_cores=True))
    return rows


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
    cpu = {k: v.median_cpu for k, v in times.items()}
    none = cpu["deepspeed/none"]
    print("\n1. masking policy (DeepSpeed step, median CPU s/step):")
    for pol in ("sgm", "random", "none"):
        t = cpu[f"deepspeed/{pol}"]
        print(f"   {pol:6s} {t * 1e3:8.1f} ms   {100 * (t / none - 1):+6.1f} % vs none")
    ds, pl = cpu["deepspeed/sgm"], cpu["plain/sgm"]
    print("\n2. DeepSpeed engine vs plain PyTorch loop (policy sgm):")
    print(f"   deepspeed {ds * 1e3:8.1f} ms   plain {pl * 1e3:8.1f} ms   overhead {100 * (ds / pl - 1):+6.1f} %")

    flops = training_flops(trainers["sgm"].cfg, batches[0])
    peak32 = machine_peak(torch.float32)
    peak16 = machine_peak(torch.bfloat16)
    achieved = flops / times["deepspeed/sgm"].best_wall
    print("\n3. FLOP/s (FlopCounterMode, forward + backward of one step):")
    print(f"   {flops / 1e9:.3f} GFLOP per step -> {achieved / 1e9:.2f} GFLOP/s achieved")
    print(f"   measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s "
          f"-> {100 * achieved / peak32:.1f} % of the fp32 peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
