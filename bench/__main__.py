"""``python -m bench [--quick] [--only 1,5,...] [--json PATH]``: every ratio of issue 8, measured
in one run on this machine, printed as a table and written as JSON (docs/performance.md).

Items: 1-3 ``bench.step_time`` (DeepSpeed vs plain step, SGM vs no masking, FLOP/s vs matmul
peak), 4 and 7 ``bench.rounds`` (round overhead vs bare Flower, scale), 5 ``bench.aggregation``
(aggregation vs memory copy), 6 ``bench.transfer`` (bytes per site per round).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.table import Row, markdown, render, write_json


def _suites(quick: bool) -> dict[str, Callable[[], list[Row]]]:
    from bench import aggregation, rounds, step_time, transfer

    return {
        "1-3": lambda: step_time.measure(quick),
        "4": lambda: rounds.overhead_row(quick),
        "5": lambda: aggregation.measure(quick),
        "6": lambda: transfer.measure(quick),
        "7": lambda: rounds.scale_rows(quick),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps / rounds / repeats (under 10 minutes on 2 cores)")
    p.add_argument("--only", default="", help="comma-separated suites to run: 1-3, 4, 5, 6, 7 (default: all)")
    p.add_argument("--json", default="runs/bench/latest.json", help="where the JSON goes")
    a = p.parse_args(argv)
    suites = _suites(a.quick)
    chosen = [s.strip() for s in a.only.split(",") if s.strip()] or list(suites)
    unknown = [s for s in chosen if s not in suites]
    if unknown:
        p.error(f"--only: unknown suite {unknown[0]!r} (known: {', '.join(suites)})")
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for name in chosen:
        t = time.perf_counter()
        rows.extend(suites[name]())
        seconds[name] = time.perf_counter() - t
        print(f"[bench] suite {name} done in {seconds[name]:.0f} s", flush=True)
    meta = {"command": "python -m bench" + (" --quick" if a.quick else "") + (f" --only {a.only}" if a.only else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "suite_seconds": seconds,
            "total_seconds": time.perf_counter() - t0, "load_average": os.getloadavg()}
    print()
    print(render(rows))
    print(f"\n{meta['command']}: {meta['total_seconds']:.0f} s, load average {meta['load_average'][0]:.1f}")
    write_json(rows, Path(a.json), meta)
    Path(a.json).with_suffix(".md").write_text(markdown(rows) + "\n")
    print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
