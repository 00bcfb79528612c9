"""How long ``fedpanfm --help`` takes, as a new user's shell runs it (issue 18: under 1 s).

Not a test: prints the figure. Each repeat is a fresh process running the installed console
script (the interpreter start-up included); the median and the slowest are printed, plus the
same for ``fedpanfm simulate --help`` (one plugin imported). ``python -m bench.cli_help [N]``.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0


def timed(argv: list[str], repeats: int) -> list[float]:
    """Wall seconds of ``argv`` run ``repeats`` times (after one untimed warm-up run)."""
    subprocess.run(argv, capture_output=True, check=True)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repeats = int(args[0]) if args else 7
    exe = shutil.which("fedpanfm")
    base = [exe] if exe else [sys.executable, "-m", "fedpanfm.cli"]
    for label, cmd in (("fedpanfm --help", [*base, "--help"]), ("fedpanfm simulate --help", [*base, "simulate", "--help"])):
        s = timed(cmd, repeats)
        verdict = "met" if statistics.median(s) < TARGET_S else "MISSED"
        print(f"{label:<26} median {statistics.median(s):.3f} s, slowest {max(s):.3f} s over {repeats} runs "
              f"(target < {TARGET_S:g} s: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
