"""The console of a run: one line per round, a bar, nothing repeated; the rest in run.log.

The end-to-end test runs ``fedpanfm simulate`` as a user would (a subprocess, 2 sites, 2 rounds,
a small held-out probe cohort) and reads what it printed and what it left in the run folder.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedpanfm.console import ROUNDS, RoundConsole, RoundStatus, human_bytes
from fedpanfm.run_log import NoiseFilter
from orchestration.round_lines import RoundLines

ROOT = Path(__file__).resolve().parents[1]
ROUND_LINE = re.compile(r"^round (\d+)/(\d+)  train \S+  val \S+  AUROC \S+ \([+-]\d\.\d{3}\)  entropy \S+  "
                        r"sites \d+ ok  \S+ s  \S+ [kMG]?B$")


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_round_line_shows_every_figure() -> None:
    s = RoundStatus(round=2, last=10, train_loss=6.8791, val_loss=3.42, auroc=0.612, auroc_round0=0.58,
                    entropy=0.936, sites_ok=3, sites_failed=1, seconds=1.26, bytes=5_812_000)
    assert s.line() == ("round  2/10  train 6.879  val 3.420  AUROC 0.612 (+0.032)  entropy 0.94  "
                        "sites 3 ok / 1 failed  1.3 s  5.8 MB")
    assert RoundStatus(round=0, last=3, auroc=0.5).line() == "round 0/3  initial weights  AUROC 0.500"
    # Unmeasured figures read "-", never a made-up number; no probe, no AUROC column.
    assert RoundStatus(round=1, last=1).line() == "round 1/1  train -  val -  entropy -  sites 0 ok  - s  - B"
    assert [human_bytes(x) for x in (999, 1000, 2_500_000, 3e12)] == ["999 B", "1.0 kB", "2.5 MB", "3000.0 GB"]


def test_lines_wait_for_their_probe_and_go_out_in_round_order() -> None:
    out: list[RoundStatus] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(record.round_status)  # type: ignore[attr-defined]

    keep = Keep()
    ROUNDS.addHandler(keep)
    old = ROUNDS.level
    ROUNDS.setLevel(logging.INFO)
    try:
        lines = RoundLines(last=3, probing=True)
        lines.probe_result(0, {"probe/auroc_macro": 0.50})
        lines.status(RoundStatus(round=1, last=3, train_loss=1.0))
        assert [s.round for s in out] == [0]  # round 1 waits for its AUROC
        lines.probe_result(1, {"probe/auroc_macro": 0.55})
        lines.status(RoundStatus(round=2, last=3))
        lines.probe_result(2, None)  # skipped or failed: the line still goes out, without a value
        lines.status(RoundStatus(round=3, last=3))
        lines.flush()  # the probe ended without round 3
    finally:
        ROUNDS.removeHandler(keep)
        ROUNDS.setLevel(old)
    assert [s.round for s in out] == [0, 1, 2, 3]
    assert out[1].auroc == 0.55 and out[1].auroc_round0 == 0.50 and "(+0.050)" in out[1].line()
    assert out[2].auroc is None and out[3].auroc is None


def test_round_console_prints_each_line_once_and_the_bar_once_off_a_terminal() -> None:
    buf = io.StringIO()
    console = RoundConsole(buf)
    plan = _record("fedpanfm.rounds", logging.INFO, "plan")
    plan.round_plan = (0, 2)  # type: ignore[attr-defined]
    console.handle(plan)
    for r in (1, 2):
        rec = _record("fedpanfm.rounds", logging.INFO, "r")
        rec.round_status = RoundStatus(round=r, last=2, train_loss=1.0 / r)  # type: ignore[attr-defined]
        console.handle(rec)
    console.close()
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert lines[0].startswith("round 1/2  train 1.000") and lines[1].startswith("round 2/2  train 0.500")
    assert len(lines) == 3 and lines[2].startswith("rounds 2/2") and "ETA" in lines[2]


def test_noise_filter_drops_only_the_listed_messages() -> None:
    f = NoiseFilter()
    assert not f.filter(_record("alembic.runtime.plugins", logging.INFO, "setup plugin alembic.autogenerate.schemas"))
    assert not f.filter(_record("flwr", logging.WARNING, "DEPRECATED FEATURE: The `run_simulation` function is "
                                                         "deprecated and will be removed"))
    assert not f.filter(_record("py.warnings", logging.WARNING, "/x/ray/_private/worker.py:2051: FutureWarning: Tip: "
                                "In future versions of Ray, Ray will no longer override accelerator"))
    # Same loggers, other messages: kept.
    assert f.filter(_record("flwr", logging.WARNING, "aggregate_train: dropping reply from node 3"))
    assert f.filter(_record("py.warnings", logging.WARNING, "UserWarning: something else"))
    assert f.filter(_record("alembic.runtime.migration", logging.INFO, "setup plugin x"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = tmp_path_factory.mktemp("console")
    out = work / "run"
    sets = [f"cohort={work / 'cohort'}", f"evaluation.server_cohort={work / 'probe'}",
            "synth.sites=2", "synth.subjects=6", "federation.rounds=2", "federation.min_sites=2",
            "data.val_fraction=0.34", "data.batch_size=3",
            "evaluation.study.eval_sites=1", "evaluation.study.eval_subjects=24"]
    cmd = [sys.executable, "-m", "fedpanfm.cli", "simulate", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--out", str(out), "--cpus", "2", *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, out


@pytest.mark.timeout(600)
def test_console_of_a_small_run(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    res, out = quick_run
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) <= 15, "\n".join(lines)
    assert len(lines) == len(set(lines)), "a console line is repeated:\n" + "\n".join(lines)
    rounds = [m for ln in lines if (m := ROUND_LINE.match(ln))]
    assert [int(m[1]) for m in rounds] == [1, 2] and all(m[2] == "2" for m in rounds)
    assert any(re.match(r"^round 0/2  initial weights  AUROC \d\.\d{3}$", ln) for ln in lines)
    assert any(ln.startswith("fedpanfm: 2 rounds over sites") for ln in lines)
    assert not any("DEPRECATED" in ln or "alembic" in ln or "FutureWarning" in ln for ln in lines)


@pytest.mark.timeout(600)
def test_run_log_holds_flowers_messages_once(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = quick_run
    log = (out / "run.log").read_text()
    assert log.count("flwr: Starting FedPanFM strategy:") == 1
    assert log.count("flwr: [ROUND 2/2]") == 1
    assert log.count("fedpanfm.rounds: round 2/2  train") == 1
    # The noise is filtered from the console only: run.log keeps everything.
    assert "DEPRECATED FEATURE: The `run_simulation` function" in log
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["probe_auroc"]) <= {"0", "1", "2"} and "0" in summary["probe_auroc"]
