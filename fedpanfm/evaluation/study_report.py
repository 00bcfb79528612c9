"""The SGM study's written results: per-run CSV, mean ± std table, target checks and plots.

Files under the study folder::

    runs.csv        one row per (arm, seed)
    table.csv       one row per arm: mean and std over seeds of every metric
    results.md      the table, the targets of issue 5 with pass / miss / not run and margin, the
                    headroom line (supervised_factors - random_init), timings
    study_auroc.png  study_attention.png
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpanfm.evaluation.report import _jsonable
from fedpanfm.evaluation.study import DOMINANT, ArmBudget, ArmRun

#: Study metrics: (ArmScore attribute, column name, description).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("macro", "macro_auroc", "test macro AUROC, all organs"),
    ("macro_no_dominant", "auroc_no_adipose_heart", "test macro AUROC, adipose + heart removed at inference"),
    ("full_same_subjects", "auroc_all_same_subjects", "all-organ macro AUROC on the same subjects"),
    ("entropy", "attention_entropy", "mean normalised CLS-attention entropy over organs"),
    ("dominant_attention", "adipose_heart_attention", "pooled CLS-attention share of adipose + heart"),
    ("dominant_info", "adipose_heart_info", "information share of adipose + heart (probes refitted without each)"),
    ("dominant_inference_info", "adipose_heart_inference_share",
     "share of adipose + heart in the AUROC drops of the full-organ probes with each removed at inference"),
    ("signal_r2", "disease_factor_r2", "mean ridge R^2 of the latent factors the labels read, from the CLS"),
    ("body_size_r2", "body_size_r2", "ridge R^2 of the body-size nuisance factor, from the CLS"),
    ("participation_ratio", "cls_participation_ratio", "effective number of directions of the CLS embedding"),
)

#: Arms that are references, not compared methods (drawn hatched; targets never read them).
REFERENCE_ARMS: tuple[str, ...] = ("supervised_factors",)

TABLE_HEADER: tuple[str, ...] = (
    "arm", "seeds", *[f"{c}_{s}" for _, c, _ in METRICS for s in ("mean", "std")], "steps", "seconds_mean",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarise(runs: Sequence[ArmRun]) -> dict[str, dict[str, Any]]:
    """arm -> {column: value} with ``<metric>_mean`` / ``<metric>_std`` over the arm's seeds (NaN
    seeds left out), ``seeds``, ``steps`` and ``seconds_mean``; arms in the order first run."""
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        rs = [r for r in runs if r.arm == arm]
        row: dict[str, Any] = {"arm": arm, "seeds": len(rs)}
        for attr, col, _ in METRICS:
            row[f"{col}_mean"], row[f"{col}_std"] = _mean_std([getattr(r.score, attr) for r in rs])
        steps = sorted({r.steps for r in rs})
        row["steps"] = steps[0] if len(steps) == 1 else "/".join(map(str, steps))
        row["seconds_mean"] = statistics.fmean(r.seconds for r in rs)
        out[arm] = row
    return out


@dataclass
class Target:
    """One claim of issue 5 checked on the study's means.

    Args:
        claim: the claim in words.
        holds: True / False on the means; None when an arm it needs was not run (``not_run``)
            or a value it needs is undefined (NaN).
        detail: the values and margin, or why there is no verdict.
        not_run: the arms it needs that the study did not run.
    """

    claim: str
    holds: bool | None
    detail: str
    not_run: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """``holds``, ``**missed**``, ``not run`` (an arm missing) or ``not measured`` (a NaN)."""
        if self.holds is None:
            return "not run" if self.not_run else "not measured"
        return "holds" if self.holds else "**missed**"


def _m(table: Mapping[str, Mapping[str, Any]], arm: str, col: str) -> float:
    # An arm not run (or a metric not in the table) is "not measured", never a pass or a miss.
    return float(table.get(arm, {}).get(f"{col}_mean", math.nan))


def _s(table: Mapping[str, Mapping[str, Any]], arm: str, col: str) -> float:
    return float(table.get(arm, {}).get(f"{col}_std", math.nan))


def _noise(table: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str, str]]) -> str:
    """A note for each compared pair whose mean difference is below the larger std over seeds."""
    notes = []
    for a, b, col in pairs:
        diff = abs(_m(table, a, col) - _m(table, b, col))
        std = max(float(table.get(a, {}).get(f"{col}_std", math.nan)), float(table.get(b, {}).get(f"{col}_std", math.nan)))
        if diff < std:
            notes.append(f"{a} vs {b} differ by {diff:.3f} < std {std:.3f}")
    return f"; within seed noise: {', '.join(notes)}" if notes else ""


def check_targets(table: Mapping[str, Mapping[str, Any]]) -> list[Target]:
    """The four targets of issue 5 and the shortcut precondition, on the means over seeds.

    A comparison whose difference is smaller than the arms' std over seeds is flagged in the
    detail ("within seed noise"): the verdict is on the means, the flag says how much it means.
    A claim needing an arm the study did not run (``evaluation.study.arms`` a subset) is "not
    run", one needing a value that is NaN is "not measured"; neither passes nor fails.

    Args:
        table: arm -> ``<column>_mean`` / ``<column>_std`` (:func:`summarise`); the arms run.
    """
    out: list[Target] = []

    def add(claim: str, arms: Sequence[str], values: Sequence[float], holds: bool, detail: str,
            pairs: Sequence[tuple[str, str, str]] = ()) -> None:
        missing = tuple(a for a in dict.fromkeys(arms) if a not in table)
        if missing:
            out.append(Target(claim, None, f"not run: arm(s) {', '.join(missing)} not in this study", missing))
        elif any(math.isnan(v) for v in values):
            out.append(Target(claim, None, "not measured (a value is undefined)"))
        else:
            out.append(Target(claim, holds, detail + _noise(table, pairs)))

    sgm, cen = _m(table, "fed_sgm", "macro_auroc"), _m(table, "centralized", "macro_auroc")
    add("fed_sgm macro AUROC >= 0.97 x centralized", ["fed_sgm", "centralized"], [sgm, cen], sgm >= 0.97 * cen,
        f"{sgm:.3f} vs 0.97 x {cen:.3f} = {0.97 * cen:.3f} (ratio {sgm / cen if cen else math.nan:.3f})",
        [("fed_sgm", "centralized", "macro_auroc")])
    for base in ("random_init", "single_site"):
        b = _m(table, base, "macro_auroc")
        add(f"fed_sgm macro AUROC >= {base} + 0.05", ["fed_sgm", base], [sgm, b], sgm - b >= 0.05,
            f"{sgm:.3f} - {b:.3f} = {sgm - b:+.3f}", [("fed_sgm", base, "macro_auroc")])
    col = "auroc_no_adipose_heart"
    s, r, n = _m(table, "fed_sgm", col), _m(table, "fed_random", col), _m(table, "fed_none", col)
    add("adipose + heart removed: fed_sgm >= fed_random >= fed_none", ["fed_sgm", "fed_random", "fed_none"],
        [s, r, n], s >= r >= n,
        f"sgm {s:.3f}, random {r:.3f}, none {n:.3f} (sgm - random {s - r:+.3f}, random - none {r - n:+.3f})",
        [("fed_sgm", "fed_random", col), ("fed_random", "fed_none", col)])
    es, en = _m(table, "fed_sgm", "attention_entropy"), _m(table, "fed_none", "attention_entropy")
    add("attention entropy fed_sgm > fed_none", ["fed_sgm", "fed_none"], [es, en], es > en,
        f"{es:.4f} vs {en:.4f} ({es - en:+.4f})",
        [("fed_sgm", "fed_none", "attention_entropy")])
    att, inf = _m(table, "fed_none", "adipose_heart_attention"), _m(table, "fed_none", "adipose_heart_info")
    inference = _m(table, "fed_none", "adipose_heart_inference_share")
    add("precondition: fed_none shows the shortcut (adipose + heart attention > 1.5 x their information share)",
        ["fed_none"], [att, inf], att > 1.5 * inf,
        f"attention {att:.2f} vs information {inf:.2f} ± {_s(table, 'fed_none', 'adipose_heart_info'):.2f} "
        f"(share of the inference-time drops, not refitted: {inference:.2f})")
    return out


def headroom_line(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The supervised reference's gain over the random encoder, as one results.md line.

    Args:
        table: :func:`summarise`'s table.

    Returns:
        "Headroom: supervised_factors - random_init = +x.xxx macro AUROC (...)", or "" when the
        study did not run both arms (or a mean is undefined).
    """
    sup, rnd = _m(table, "supervised_factors", "macro_auroc"), _m(table, "random_init", "macro_auroc")
    if math.isnan(sup) or math.isnan(rnd):
        return ""
    return (f"Headroom: supervised_factors - random_init = {sup - rnd:+.3f} macro AUROC (the most a linear "
            "probe on this architecture gained here when told the factors)")


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The mean ± std table (one row per arm)."""
    cols = [c for _, c, _ in METRICS]
    lines = ["| arm | seeds | " + " | ".join(cols) + " | steps | s / run |", "|" + "---|" * (len(cols) + 4)]
    for arm, row in table.items():
        cells = [f"{_fmt(row[f'{c}_mean'])} ± {_fmt(row[f'{c}_std'])}" for c in cols]
        lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(cells) + f" | {row['steps']} | {row['seconds_mean']:.0f} |")
    return "\n".join(lines)


def _plots(runs: Sequence[ArmRun], table: Mapping[str, Mapping[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    x = list(range(len(arms)))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for off, col, label in ((-0.2, "macro_auroc", "all organs"), (0.2, "auroc_no_adipose_heart", "adipose + heart removed")):
        bars = ax.bar([i + off for i in x], [table[a][f"{col}_mean"] for a in arms], 0.4,
                      yerr=[table[a][f"{col}_std"] for a in arms], capsize=3, label=label)
        for a, bar in zip(arms, bars):
            if a in REFERENCE_ARMS:  # hatched: a reference line, not a compared arm
                bar.set_hatch("//")
    for r in runs:  # each seed as a dot, so the spread is visible with 3 seeds
        i = arms.index(r.arm)
        ax.plot([i - 0.2], [r.score.macro], "k.", ms=3)
        ax.plot([i + 0.2], [r.score.macro_no_dominant], "k.", ms=3)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_xticks(x, arms, rotation=30)
    hatched = " (hatched: reference, not compared)" if any(a in REFERENCE_ARMS for a in arms) else ""
    ax.set(ylabel="test macro AUROC", title="SGM study: probe AUROC (mean ± std over seeds)" + hatched)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "study_auroc.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar([i - 0.2 for i in x], [table[a]["adipose_heart_attention_mean"] for a in arms], 0.4,
           yerr=[table[a]["adipose_heart_attention_std"] for a in arms], capsize=3, label="CLS attention share")
    a1.bar([i + 0.2 for i in x], [0.0 if math.isnan(table[a]["adipose_heart_info_mean"]) else table[a]["adipose_heart_info_mean"]
                                  for a in arms], 0.4, label="information share")
    a1.set_xticks(x, arms, rotation=30)
    a1.set(ylabel="adipose + heart share", title="Dominant organs: attention vs information")
    a1.legend(fontsize=7)
    a2.bar(x, [table[a]["attention_entropy_mean"] for a in arms], yerr=[table[a]["attention_entropy_std"] for a in arms],
           capsize=3)
    a2.set_xticks(x, arms, rotation=30)
    a2.set(ylabel="normalised entropy", title="Organ attention entropy")
    fig.tight_layout()
    p2 = out / "study_attention.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def write_study(runs: Sequence[ArmRun], out: Path, budget: Mapping[str, ArmBudget], seconds: Mapping[str, float],
                single_site_choice: Mapping[int, str], command: str = "",
                reference: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write ``runs.csv``, ``table.csv``, ``results.md``, ``study.json`` and the plots under ``out``.

    Args:
        runs: every (arm, seed) run.
        out: the study folder.
        budget: the planned budget per arm (:func:`fedpanfm.evaluation.study.plan_budget`).
        seconds: wall times (``prepare``, ``total``, ``<arm>:<seed>``).
        single_site_choice: seed -> the site the single-site arm chose.
        command: the command line that produced the study (written into results.md).
        reference: the token-proportional attention numbers (:func:`~fedpanfm.evaluation.study.token_reference`).

    Returns:
        name -> path of every file written.
    """
    if not runs:
        raise ValueError("write_study: no runs to write")
    out = Path(out)
    paths: dict[str, Path] = {}
    paths["runs.csv"] = out / "runs.csv"
    with paths["runs.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", *[c for _, c, _ in METRICS], "val_macro_auroc", "steps", "seconds", "note"])
        for r in runs:
            w.writerow([r.arm, r.seed, *[f"{getattr(r.score, a):.6g}" for a, _, _ in METRICS],
                        f"{r.score.val_macro:.6g}", r.steps, f"{r.seconds:.1f}", r.note])
    table = summarise(runs)
    paths["table.csv"] = out / "table.csv"
    with paths["table.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABLE_HEADER)
        for row in table.values():
            w.writerow([f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in TABLE_HEADER])
    targets = check_targets(table)
    headroom = headroom_line(table)
    trained = [b for a, b in budget.items() if a != "random_init"]
    budget_text = (f"every trained arm: {trained[0].steps} optimiser steps, {trained[0].subject_epochs} subject-epochs"
                   if trained else "no trained arm budget")
    md = [
        "# SGM study results",
        "",
        (f"Command: `{command}`" if command else ""),
        "",
        f"Seeds {sorted({r.seed for r in runs})}; {budget_text} (docs/results.md, budget). "
        f"Single site chosen per seed: {dict(single_site_choice) or 'n/a'}. Protocol: docs/evaluation.md.",
        "",
        "## Mean ± std over seeds",
        "",
        markdown_table(table),
        "",
        (f"Token-proportional reference (attention spread by token counts, what an untrained encoder "
         f"is close to): adipose_heart_attention {_fmt(reference['adipose_heart_attention'])}, "
         f"attention_entropy {_fmt(reference['attention_entropy'])}." if reference else ""),
        "",
        "Columns: " + "; ".join(f"`{c}`: {d}" for _, c, d in METRICS) + f". Dominant organs: {', '.join(DOMINANT)}.",
        "",
        "## Targets (issue 5)",
        "",
        "| claim | verdict | values |",
        "|---|---|---|",
        *[f"| {t.claim} | {t.verdict} | {t.detail} |" for t in targets],
        "",
        headroom,
        "",
        "## Time",
        "",
        f"Total {seconds.get('total', math.nan):.0f} s (prepare {seconds.get('prepare', math.nan):.0f} s); "
        + ", ".join(f"{a} {row['seconds_mean']:.0f} s" for a, row in table.items()) + " per run.",
        "",
    ]
    paths["results.md"] = out / "results.md"
    paths["results.md"].write_text("\n".join(md))
    paths["study.json"] = out / "study.json"

    paths["study.json"].write_text(json.dumps(_jsonable({
        "table": table,
        "targets": [{**t.__dict__, "verdict": t.verdict} for t in targets],
        "headroom": headroom,
        "runs": [{"arm": r.arm, "seed": r.seed, "steps": r.steps, "seconds": r.seconds, "note": r.note,
                  **r.score.__dict__} for r in runs],
        "budget": {a: {**b.__dict__, "subject_epochs": b.subject_epochs} for a, b in budget.items()},
        "seconds": dict(seconds),
        "reference": dict(reference or {}),
        "command": command,
    }), indent=2) + "\n")
    for p in _plots(runs, table, out):
        paths[p.name] = p
    return paths


__all__ = [
    "METRICS", "REFERENCE_ARMS", "TABLE_HEADER", "Target", "check_targets", "headroom_line", "markdown_table",
    "summarise", "write_study",
]
