"""The SGM study's written results: per-run CSV, mean ± std table, target checks and plots.

Files under the study folder::

    runs.csv          one row per (arm, seed)
    table.csv         one row per arm: mean and std over seeds of every metric
    results.md        the table, the baseline rows, the targets of issue 14 per seed with pass /
                      miss / not run and margin, the headroom line, timings
    study.json        everything above
    study-latest.json the committed summary: commit, command, config, per-arm and per-baseline
                      values one per seed (docs/results.md, "Reading study-latest.json")
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

import torch

from fedpanfm.evaluation.auroc import bootstrap_counts, percentile_ci
from fedpanfm.evaluation.probe import ProbeScores
from fedpanfm.evaluation.report import _jsonable
from fedpanfm.evaluation.study import DOMINANT, ArmBudget, ArmRun, ArmScore

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
    ("auroc_cls", "macro_auroc_cls", "test macro AUROC, readout cls"),
    ("auroc_organ_mean", "macro_auroc_organ_mean", "test macro AUROC, readout organ_mean"),
    ("auroc_both", "macro_auroc_both", "test macro AUROC, readout both"),
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
    """One claim of issue 14 ("What the study must show") checked at one seed.

    Args:
        claim: the claim in words.
        seed: the seed it was checked at.
        holds: True / False; None when an arm it needs was not run (``not_run``) or a value it
            needs is undefined (NaN).
        margin: by how much it holds (> 0) or is missed (< 0), in the claim's unit; NaN without a verdict.
        detail: the values, or why there is no verdict.
        not_run: the arms it needs that the study did not run.
    """

    claim: str
    seed: int
    holds: bool | None
    margin: float
    detail: str
    not_run: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """``pass``, ``**miss**``, ``not run`` (an arm missing) or ``not measured`` (a NaN)."""
        if self.holds is None:
            return "not run" if self.not_run else "not measured"
        return "pass" if self.holds else "**miss**"


#: The claims: (claim, arms needed, arm -> ArmScore  ->  (value, threshold, strict)); the claim
#: holds when value >= threshold (value > threshold when strict); margin = value - threshold.
CLAIMS: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("fed_sgm >= random_init + 0.10", ("fed_sgm", "random_init"),
     lambda s: (s["fed_sgm"].macro, s["random_init"].macro + 0.10, False)),
    ("fed_sgm >= 0.97 x centralized", ("fed_sgm", "centralized"),
     lambda s: (s["fed_sgm"].macro, 0.97 * s["centralized"].macro, False)),
    ("fed_sgm >= single_site + 0.05", ("fed_sgm", "single_site"),
     lambda s: (s["fed_sgm"].macro, s["single_site"].macro + 0.05, False)),
    ("adipose + heart removed: fed_sgm - fed_none >= 0.02", ("fed_sgm", "fed_none"),
     lambda s: (s["fed_sgm"].macro_no_dominant - s["fed_none"].macro_no_dominant, 0.02, False)),
    # The attention claims: an untrained encoder already spreads attention by token count, and
    # adipose + heart hold the most tokens, so "more than their information share" alone holds
    # before any training. A shortcut is what training adds beyond the random-init encoder, and a
    # difference between arms counts when the 95 % paired bootstrap interval over the evaluation
    # subjects excludes 0 (value = the interval's lower bound).
    ("fed_none shows the shortcut: adipose + heart attention > 1.5 x their information share", ("fed_none",),
     lambda s: (s["fed_none"].dominant_attention, 1.5 * s["fed_none"].dominant_info, True)),
    ("fed_none shows the shortcut: adipose + heart attention > random_init's (95 % paired bootstrap)",
     ("fed_none", "random_init"), lambda s: (paired_gap(s["fed_none"], s["random_init"])[1], 0.0, True)),
    ("SGM lowers adipose + heart attention: fed_sgm < fed_none (95 % paired bootstrap)", ("fed_sgm", "fed_none"),
     lambda s: (paired_gap(s["fed_none"], s["fed_sgm"])[1], 0.0, True)),
)

#: Resamples of the paired attention bootstrap, and its seed (fixed: a verdict must not move
#: between two writes of the same runs).
PAIRED_BOOTSTRAP, PAIRED_SEED = 2000, 0


def paired_gap(a: ArmScore, b: ArmScore) -> tuple[float, float, float]:
    """Mean over the subjects both arms scored of (a's - b's) adipose + heart attention share, and
    its 95 % percentile bootstrap interval (subjects resampled); NaNs when none is shared."""
    common = [k for k in a.dominant_by_subject if k in b.dominant_by_subject]
    if not common:
        return math.nan, math.nan, math.nan
    gap = torch.tensor([a.dominant_by_subject[k] - b.dominant_by_subject[k] for k in common], dtype=torch.float64)
    counts = bootstrap_counts(len(common), PAIRED_BOOTSTRAP, torch.Generator().manual_seed(PAIRED_SEED))
    lo, hi = percentile_ci(counts @ gap / len(common), 0.95)
    return float(gap.mean()), lo, hi


def check_targets(runs: Sequence[ArmRun]) -> list[Target]:
    """Every claim of :data:`CLAIMS` at every seed of ``runs`` (claim-major, seeds ascending).

    A claim needing an arm the study did not run at that seed is "not run", one needing a NaN
    value "not measured"; neither passes nor fails.
    """
    out: list[Target] = []
    seeds = sorted({r.seed for r in runs})
    for claim, arms, rule in CLAIMS:
        for seed in seeds:
            scores = {r.arm: r.score for r in runs if r.seed == seed}
            missing = tuple(a for a in arms if a not in scores)
            if missing:
                out.append(Target(claim, seed, None, math.nan, f"not run: arm(s) {', '.join(missing)} not in this study",
                                  missing))
                continue
            value, threshold, strict = rule(scores)
            if math.isnan(value) or math.isnan(threshold):
                out.append(Target(claim, seed, None, math.nan, "not measured (a value is undefined)"))
                continue
            margin = value - threshold
            holds = margin > 0 if strict else margin >= 0
            out.append(Target(claim, seed, holds, margin, f"{value:.3f} vs {threshold:.3f} ({margin:+.3f})"))
    return out


def targets_table(targets: Sequence[Target]) -> str:
    """Markdown: one row per claim, one column per seed (verdict and margin), and "every seed"."""
    seeds = sorted({t.seed for t in targets})
    lines = ["| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | every seed |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for claim in dict.fromkeys(t.claim for t in targets):
        ts = {t.seed: t for t in targets if t.claim == claim}
        cells = [f"{ts[s].verdict} ({ts[s].margin:+.3f})" if ts[s].holds is not None else ts[s].verdict for s in seeds]
        verdicts = [ts[s].holds for s in seeds]
        every = ("pass" if all(verdicts) else "**miss**") if None not in verdicts else \
            ("**miss**" if False in verdicts else "n/a")
        lines.append(f"| {claim} | " + " | ".join(cells) + f" | {every} |")
    return "\n".join(lines)


def _m(table: Mapping[str, Mapping[str, Any]], arm: str, col: str) -> float:
    # An arm not run (or a metric not in the table) is "not measured".
    return float(table.get(arm, {}).get(f"{col}_mean", math.nan))


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


def git_commit(path: Path | None = None) -> str:
    """The git HEAD of the repository holding ``path`` (default: this package), or ``"unknown"``."""
    import subprocess

    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


#: Per-arm lists of study-latest.json: key -> ArmScore attribute (one value per seed).
LATEST_ARM_KEYS: tuple[tuple[str, str], ...] = (
    ("macro_auroc", "macro"),
    ("macro_auroc_without_adipose_heart", "macro_no_dominant"),
    ("macro_auroc_cls", "auroc_cls"),
    ("macro_auroc_organ_mean", "auroc_organ_mean"),
    ("macro_auroc_both", "auroc_both"),
    ("adipose_heart_attention", "dominant_attention"),
    ("adipose_heart_info", "dominant_info"),
    ("attention_entropy", "entropy"),
    ("disease_factor_r2", "signal_r2"),
    ("cls_participation_ratio", "participation_ratio"),
)


def latest_dict(runs: Sequence[ArmRun], baselines: Mapping[int, Mapping[str, ProbeScores]], command: str,
                config: Mapping[str, Any], commit: str, targets: Sequence[Target]) -> dict[str, Any]:
    """The ``study-latest.json`` content (docs/results.md, "Reading study-latest.json").

    ``arms`` holds the compared arms, ``baselines`` the feature rows (one value per seed, seeds
    in ``seeds`` order) and the reference arms (:data:`REFERENCE_ARMS`).
    """
    seeds = sorted({r.seed for r in runs} | set(baselines))
    arms: dict[str, dict[str, Any]] = {}
    refs: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        by_seed = {r.seed: r for r in runs if r.arm == arm}
        rs = [by_seed.get(s) for s in seeds]
        entry: dict[str, Any] = {k: [getattr(r.score, a) if r else math.nan for r in rs] for k, a in LATEST_ARM_KEYS}
        entry.update({"seeds": [s for s in seeds if s in by_seed], "steps": [r.steps if r else None for r in rs],
                      "seconds": [r.seconds if r else None for r in rs], "note": [r.note if r else "" for r in rs]})
        (refs if arm in REFERENCE_ARMS else arms)[arm] = entry
    rows: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(k for b in baselines.values() for k in b):
        rows[name] = {"macro_auroc": [baselines[s][name].macro if name in baselines.get(s, {}) else math.nan
                                      for s in seeds]}
    rows.update(refs)
    primary = config.get("evaluation", {}).get("study", {}).get("primary_readout", "cls")
    return _jsonable({
        "commit": commit,
        "command": command,
        "seeds": seeds,
        "primary_readout": primary,
        "arms": arms,
        "baselines": rows,
        "targets": [{"claim": t.claim, "seed": t.seed, "verdict": t.verdict.replace("**", ""), "margin": t.margin,
                     "detail": t.detail} for t in targets],
        "config": dict(config),
    })


def baselines_table(baselines: Mapping[int, Mapping[str, ProbeScores]]) -> str:
    """Markdown: one row per baseline row, macro AUROC mean ± std and per seed."""
    seeds = sorted(baselines)
    lines = ["| row | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for name in dict.fromkeys(k for b in baselines.values() for k in b):
        v = [baselines[s][name].macro if name in baselines[s] else math.nan for s in seeds]
        m, sd = _mean_std(v)
        lines.append(f"| {name} | {_fmt(m)} ± {_fmt(sd)} | " + " | ".join(_fmt(x) for x in v) + " |")
    return "\n".join(lines)


def write_study(runs: Sequence[ArmRun], out: Path, budget: Mapping[str, ArmBudget], seconds: Mapping[str, float],
                single_site_choice: Mapping[int, str], command: str = "",
                reference: Mapping[str, float] | None = None,
                baselines: Mapping[int, Mapping[str, ProbeScores]] | None = None,
                config: Mapping[str, Any] | None = None, commit: str | None = None) -> dict[str, Path]:
    """Write ``runs.csv``, ``table.csv``, ``results.md``, ``study.json``, ``study-latest.json`` and
    the plots under ``out``.

    Args:
        runs: every (arm, seed) run.
        out: the study folder.
        budget: the planned budget per arm (:func:`fedpanfm.evaluation.study.plan_budget`).
        seconds: wall times (``prepare``, ``total``, ``<arm>:<seed>``).
        single_site_choice: seed -> the site the single-site arm chose.
        command: the command line that produced the study (written into results.md).
        reference: the token-proportional attention numbers (:func:`~fedpanfm.evaluation.study.token_reference`).
        baselines: seed -> baseline row -> test scores (``Study.baselines``).
        config: the study's config as a dict (into study-latest.json).
        commit: the git commit; None = :func:`git_commit`.

    Returns:
        name -> path of every file written.
    """
    if not runs:
        raise ValueError("write_study: no runs to write")
    out = Path(out)
    baselines = baselines or {}
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
    targets = check_targets(runs)
    headroom = headroom_line(table)
    trained = [b for a, b in budget.items() if a not in ("random_init", *REFERENCE_ARMS)]
    budget_text = (f"every trained arm: {trained[0].steps} optimiser steps, {trained[0].subject_epochs} subject-epochs"
                   if trained else "no trained arm budget")
    primary = sorted({r.score.readout for r in runs})
    md = [
        "# SGM study results",
        "",
        (f"Command: `{command}`" if command else ""),
        "",
        f"Seeds {sorted({r.seed for r in runs})}; {budget_text} (docs/results.md, budget). "
        f"Single site chosen per seed: {dict(single_site_choice) or 'n/a'}. Primary readout (macro_auroc): "
        f"{', '.join(primary)}. Protocol: docs/evaluation.md.",
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
        "## Baseline rows (same split and probe protocol as the arms)",
        "",
        baselines_table(baselines) if baselines else "No baseline rows in this study.",
        "",
        "## Targets (issue 14), per seed: verdict (margin)",
        "",
        targets_table(targets),
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
        "baselines": {str(s): {k: v.macro for k, v in b.items()} for s, b in baselines.items()},
        "budget": {a: {**b.__dict__, "subject_epochs": b.subject_epochs} for a, b in budget.items()},
        "seconds": dict(seconds),
        "reference": dict(reference or {}),
        "command": command,
    }), indent=2) + "\n")
    paths["study-latest.json"] = out / "study-latest.json"
    latest = latest_dict(runs, baselines, command, config or {}, commit if commit is not None else git_commit(), targets)
    paths["study-latest.json"].write_text(json.dumps(latest, indent=2) + "\n")
    for p in _plots(runs, table, out):
        paths[p.name] = p
    return paths


__all__ = [
    "CLAIMS", "LATEST_ARM_KEYS", "METRICS", "REFERENCE_ARMS", "TABLE_HEADER", "Target", "baselines_table",
    "check_targets", "git_commit", "headroom_line", "latest_dict", "markdown_table", "paired_gap", "summarise",
    "targets_table",
    "write_study",
]
