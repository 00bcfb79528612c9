"""Soak: a long in-process simulation with a tiny model; RSS per round and round-time spread.

    python -m bench.soak [--rounds 30 --sites 16 --subjects 6 --cpus 2]

Not a test: prints the server process's resident memory after every round (``memory/rss_mb``,
which the server logs each round) and min / median / max round time, and whether RSS grew
over the second half of the run (the first rounds warm caches and Ray up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from orchestration.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--sites", type=int, default=16)
    p.add_argument("--subjects", type=int, default=6, help="subjects per site")
    p.add_argument("--cpus", type=int, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedpanfm-soak-") as tmp:
        overrides = [f"cohort={tmp}/cohort", f"logging.run_dir={tmp}/runs", f"synth.sites={args.sites}",
                     f"synth.subjects={args.subjects}", f"federation.rounds={args.rounds}",
                     "federation.min_sites=2", "data.val_fraction=0.34", "data.batch_size=3"]
        s = simulate(ROOT / "configs" / "quickstart.yaml", overrides, cpus=args.cpus)
    rss = [float(x) for x in s["rss_mb_per_round"]]
    secs = [float(x) for x in s["seconds_per_round"]]
    for k, (m, t) in enumerate(zip(rss, secs), start=1):
        print(f"round {k:3d}  rss {m:8.1f} MiB  time {t:6.2f} s")
    half = rss[len(rss) // 2:]
    print(f"rounds {len(secs)}, sites {args.sites}: round time min {min(secs):.2f} s, median {statistics.median(secs):.2f} s, "
          f"max {max(secs):.2f} s; RSS first {rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, "
          f"growth over the second half {half[-1] - half[0]:+.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
