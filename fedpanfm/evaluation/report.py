"""The evaluation of one encoder (probes, robustness, attention balance) and its written report.

:func:`evaluate_encoder` computes everything from collated subjects; :func:`write_report` writes
it under an output folder::

    probes.csv  robustness.csv  attention.csv   one row per label / condition / organ
    rows.csv                                    macro AUROC of every readout and baseline row
    report.md                                   the tables with a short summary
    summary.json                                everything above, NaN as null (for the study)
    robustness_k.png  organ_drop.png  attention_balance.png  roc.png (ROC per label, test set)
    evaluation/events.out.tfevents.*            TensorBoard scalars and, in IMAGES, the four plots
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.evaluation.attention import AttentionBalance, attention_balance
from fedpanfm.evaluation.baselines import baseline_scores
from fedpanfm.evaluation.embed import Embeddings, embed_batches
from fedpanfm.evaluation.factors import CohortFactors, FactorReport, factor_decodability
from fedpanfm.evaluation.information import embeddings_without_each, information_drops
from fedpanfm.evaluation.probe import ProbeScores, ProbeSet, ProbeSplit, fit_and_score, probe_split
from fedpanfm.evaluation.readouts import READOUTS, readout
from fedpanfm.evaluation.robustness import ConditionResult, robustness_conditions
from fedpanfm.model.encoder import PanOrganEncoder
from fedpanfm.tb import RunLogger

TB_RUN = "evaluation"


@dataclass
class EvaluationResult:
    """Everything one evaluation measured.

    Args:
        split: the subject split.
        probes: the fitted probes.
        scores: test AUROC per label and macro, with bootstrap CIs.
        robustness: one row per missing-organ condition (:func:`robustness_conditions`).
        balance: the attention-balance table (over all subjects, full organs).
        meta: free-form facts (seed, subject counts, seconds, checkpoint ...).
        factors: linear decodability of the cohort's latent factors (synthetic cohorts only).
        embeddings: the full-organ embeddings (primary readout) of every subject the probes
            were fitted and scored on (for callers that score further conditions; not written).
        readout: the primary readout (``evaluation.study.primary_readout``): what ``probes``,
            ``scores``, robustness and information read.
        readouts: readout -> test scores of probes fitted on it (every readout, same split).
        baselines: baseline row -> test scores (:func:`~fedpanfm.evaluation.baselines.baseline_scores`;
            empty when ``evaluation.baselines`` is off).
    """

    split: ProbeSplit
    probes: ProbeSet
    scores: ProbeScores
    robustness: list[ConditionResult]
    balance: AttentionBalance
    meta: dict[str, Any] = field(default_factory=dict)
    factors: FactorReport | None = None
    embeddings: Embeddings | None = None
    readout: str = "cls"
    readouts: dict[str, ProbeScores] = field(default_factory=dict)
    baselines: dict[str, ProbeScores] = field(default_factory=dict)


def evaluate_encoder(
    encoder: PanOrganEncoder,
    cfg: ExperimentConfig,
    batches: Sequence[SubjectBatch],
    seed: int,
    device: torch.device | str = "cpu",
    factors: CohortFactors | None = None,
) -> EvaluationResult:
    """Probes, missing-organ robustness and attention balance of a frozen encoder.

    Args:
        encoder: the encoder (already on ``device``).
        cfg: the experiment config (``cfg.evaluation``).
        batches: every labelled subject, collated once (``collate_dataset``).
        seed: the run seed: the split is ``probe_split`` at it (``evaluation.probe_seed + seed``),
            it seeds the bootstrap, the random organ draws and the ``random_init`` baseline.
        device: where the encoder runs.
        factors: the cohort's latent factors (:func:`load_cohort_factors`); None skips that table
            and the ``oracle`` row.
    """
    t0 = time.perf_counter()
    ev = cfg.evaluation
    primary = ev.study.primary_readout
    cls_emb = embed_batches(encoder, batches, device=device)
    split = probe_split(cls_emb.subject_ids, ev, seed)
    full = readout(cls_emb, primary)
    probes, scores = fit_and_score(full, split, ev, seed)
    readouts = {r: scores if r == primary else fit_and_score(readout(cls_emb, r), split, ev, seed)[1] for r in READOUTS}
    test_ids = set(split.test)
    test_batches = []
    for b in batches:
        picked = [i for i, s in enumerate(b.subject_ids) if s in test_ids]
        if picked:
            test_batches.append(b.select(picked))
    without = embeddings_without_each(encoder, batches, device, primary)
    robustness = robustness_conditions(
        encoder, test_batches, probes, ev.random_draws, seed, device, full=full.subset(split.test),
        dropped={o: e.subset([s for s in e.subject_ids if s in test_ids]) for o, e in without.items()},
        readout_name=primary,
    )
    inference_drop = {r.organ: r.drop for r in robustness if r.kind == "drop_one"}
    info_drop = information_drops(full, without, probes, split, ev)
    balance = attention_balance(full, info_drop, inference_drop)
    meta: dict[str, Any] = {
        "seed": seed,
        "subjects": len(full),
        "train": len(split.train),
        "val": len(split.val),
        "test": len(split.test),
        "readout": primary,
        "probe_seed": ev.probe_seed + seed,
    }
    decoded = factor_decodability(cls_emb, split, *factors) if factors is not None else None
    rows = baseline_scores(batches, cfg, seed, factors, split, device) if ev.baselines else {}
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return EvaluationResult(split, probes, scores, robustness, balance, meta, decoded, full, primary, readouts, rows)


# --------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["nan" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def probe_table(result: EvaluationResult) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-label probe table (a final ``macro`` row)."""
    header = ["label", "n_train", "n_train_pos", "l2", "val_auroc", "n_test", "n_test_pos",
              "auroc", "ci_low", "ci_high", "note"]
    rows = []
    for s in result.scores.labels:
        p = result.probes.probes.get(s.label)
        rows.append([s.label, p.n_train if p else 0, p.n_train_pos if p else 0, f"{p.l2:g}" if p else "",
                     p.val_auroc if p else math.nan, s.n, s.n_pos, s.auroc, s.ci_low, s.ci_high, s.note])
    sc = result.scores
    rows.append(["macro", "", "", "", "", sc.n_subjects, "", sc.macro, sc.macro_ci_low, sc.macro_ci_high,
                 f"mean over {sc.n_macro_labels} label(s) with a defined AUROC"])
    return header, rows


def rows_table(result: EvaluationResult) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the readout / baseline table: the encoder under every readout, then
    every baseline row, all on the same split (macro AUROC over the labels)."""
    header = ["row", "macro_auroc", "ci_low", "ci_high", "labels", "note"]
    rows = []
    for name, sc in [*((f"encoder:{r}", s) for r, s in result.readouts.items()), *result.baselines.items()]:
        note = "primary readout" if name == f"encoder:{result.readout}" else ""
        rows.append([name, sc.macro, sc.macro_ci_low, sc.macro_ci_high, sc.n_macro_labels, note])
    return header, rows


def robustness_table(result: EvaluationResult) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the robustness table (one row per condition, labels as columns)."""
    labels = list(result.probes.label_names)
    header = ["condition", "kind", "organ", "k", "n", "n_excluded", "macro_auroc", "macro_std",
              "full_macro_same_subjects", "drop", *labels]
    rows = [[r.condition, r.kind, r.organ, r.k, r.n, r.n_excluded, r.macro, r.macro_std, r.full_macro, r.drop,
             *[r.per_label.get(lab, math.nan) for lab in labels]] for r in result.robustness]
    return header, rows


def attention_table(result: EvaluationResult) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the attention-balance table."""
    header = ["organ", "n_subjects", "attn_share", "pooled_share", "relative", "info_drop", "info_share",
              "inference_drop", "inference_share"]
    rows = [[o.organ, o.n_subjects, o.attn_share, o.pooled_share, o.relative, o.info_drop, o.info_share,
             o.inference_drop, o.inference_share] for o in result.balance.organs]
    return header, rows


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def summary_dict(result: EvaluationResult) -> dict[str, Any]:
    """The result as plain JSON-able data (tensors left out; NaN as None)."""
    probes = {name: {"l2": p.l2, "val_auroc": p.val_auroc, "n_train": p.n_train,
                     "n_train_pos": p.n_train_pos, "note": p.note, "l2_extended": p.l2_extended}
              for name, p in result.probes.probes.items()}
    return _jsonable({
        "meta": result.meta,
        "split": dataclasses.asdict(result.split),
        "probes": probes,
        "probe_notes": result.probes.notes,
        "scores": dataclasses.asdict(result.scores),
        "readout": result.readout,
        "readouts": {r: dataclasses.asdict(s) for r, s in result.readouts.items()},
        "baselines": {r: dataclasses.asdict(s) for r, s in result.baselines.items()},
        "robustness": [dataclasses.asdict(r) for r in result.robustness],
        "attention": dataclasses.asdict(result.balance),
        "factors": None if result.factors is None else {
            **dataclasses.asdict(result.factors), "signal_r2": result.factors.signal_r2},
    })


# --------------------------------------------------------------------------- plots


def _plots(result: EvaluationResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    full = next(r for r in result.robustness if r.kind == "full")
    ks = [r for r in result.robustness if r.kind == "random_k"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [0] + [r.k for r in ks]
    ax.errorbar(x, [full.macro] + [r.macro for r in ks], yerr=[0.0] + [r.macro_std for r in ks],
                marker="o", capsize=3, label="k random organs removed")
    ax.plot(x, [full.macro] + [r.full_macro for r in ks], "--", color="grey", label="all organs, same subjects")
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set(xlabel="organs removed per subject", ylabel="macro AUROC", title="Missing-organ robustness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "robustness_k.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    drops = [r for r in result.robustness if r.kind == "drop_one"]
    only = [r for r in result.robustness if r.kind == "only_one"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar([r.organ for r in drops], [0.0 if math.isnan(r.drop) else r.drop for r in drops])
    a1.set(ylabel="macro AUROC drop (same subjects)", title="One organ removed")
    a2.bar([r.organ for r in only], [0.0 if math.isnan(r.macro) else r.macro for r in only])
    a2.axhline(0.5, color="k", lw=0.5)
    a2.set(ylabel="macro AUROC", title="Only this organ present")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    paths.append(out_dir / "organ_drop.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    b = result.balance
    names = [o.organ for o in b.organs]
    pos = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([p - 0.2 for p in pos], [o.pooled_share for o in b.organs], 0.4, label="CLS attention share (pooled)")
    ax.bar([p + 0.2 for p in pos], [0.0 if math.isnan(o.info_share) else o.info_share for o in b.organs], 0.4,
           label="information share (probes refitted without it)")
    ax.set_xticks(pos, names, rotation=45)
    ax.set(ylabel="share", title=f"Attention balance (entropy {_fmt(b.entropy)})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "attention_balance.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- TensorBoard


def roc_points(result: EvaluationResult) -> dict[str, tuple[Any, Any, float]]:
    """label -> (false-positive rates, true-positive rates, AUROC) of each probe on the test
    subjects with a known label (scikit-learn's ``roc_curve``); labels without a probe, or whose
    test set has one class, are left out. Empty without ``result.embeddings``."""
    from sklearn.metrics import roc_curve

    if result.embeddings is None:
        return {}
    test = result.embeddings.subset([s for s in result.split.test if s in set(result.embeddings.subject_ids)])
    out: dict[str, tuple[Any, Any, float]] = {}
    for j, label in enumerate(test.label_names):
        probe = result.probes.probes.get(label)
        y = test.labels[:, j]
        known = ~torch.isnan(y)
        if probe is None or int(known.sum()) == 0 or len(set(y[known].tolist())) < 2:
            continue
        logits = probe.logits(test.cls[known]).numpy()
        fpr, tpr, _ = roc_curve(y[known].numpy(), logits)
        out[label] = (fpr, tpr, result.scores.by_label().get(label, math.nan))
    return out


#: The report's plots shown in TensorBoard's IMAGES tab, by tag.
TB_IMAGES = {"evaluation/robustness_k": "robustness_k.png", "evaluation/organ_drop": "organ_drop.png",
             "evaluation/attention_balance": "attention_balance.png", "evaluation/roc": "roc.png"}



def tensorboard_scalars(result: EvaluationResult) -> dict[int, dict[str, float]]:
    """step -> {tag: value} of the finite results (step = organs removed for ``random_k``)."""
    steps: dict[int, dict[str, float]] = {0: {}}
    s0 = steps[0]
    s0["probe/auroc_macro"] = result.scores.macro
    s0.update({f"probe/readout/{r}": s.macro for r, s in result.readouts.items()})
    s0.update({f"baseline/{r.replace(':', '/')}": s.macro for r, s in result.baselines.items()})
    s0.update({f"probe/auroc/{s.label}": s.auroc for s in result.scores.labels})
    for r in result.robustness:
        if r.kind == "full" or r.kind == "random_k":
            steps.setdefault(r.k, {})["robustness/random_k/macro"] = r.macro
            steps[r.k]["robustness/random_k/full_macro"] = r.full_macro
        elif r.kind == "drop_one":
            s0[f"robustness/drop/{r.organ}"] = r.macro
            s0[f"robustness/drop_cost/{r.organ}"] = r.drop
        else:
            s0[f"robustness/only/{r.organ}"] = r.macro
    b = result.balance
    s0["attention/entropy"] = b.entropy
    s0["attention/pooled_entropy"] = b.pooled_entropy
    for o in b.organs:
        s0[f"attention/share/{o.organ}"] = o.attn_share
        s0[f"attention/pooled_share/{o.organ}"] = o.pooled_share
        s0[f"attention/info_share/{o.organ}"] = o.info_share
    if result.factors is not None:
        s0["factors/participation_ratio"] = result.factors.participation_ratio
        s0["factors/signal_r2"] = result.factors.signal_r2
        s0.update({f"factors/r2/{k}": v for k, v in result.factors.r2.items()})
    return {k: {t: v for t, v in d.items() if math.isfinite(v)} for k, d in sorted(steps.items())}


# --------------------------------------------------------------------------- report


def write_report(result: EvaluationResult, out_dir: Path, title: str = "Evaluation") -> dict[str, Path]:
    """Write tables, plots, ``summary.json`` and TensorBoard events under ``out_dir``.

    Args:
        result: what :func:`evaluate_encoder` returned.
        out_dir: the output folder (created; files of a previous report are replaced).
        title: the report's heading (e.g. the checkpoint evaluated).

    Returns:
        name -> path of every file written (TensorBoard: its sub-run folder).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    tables = {"probes": probe_table(result), "rows": rows_table(result), "robustness": robustness_table(result),
              "attention": attention_table(result)}
    for name, (header, rows) in tables.items():
        paths[f"{name}.csv"] = out_dir / f"{name}.csv"
        _write_csv(paths[f"{name}.csv"], header, rows)
    sc, b, m = result.scores, result.balance, result.meta
    md = [
        f"# {title}",
        "",
        f"Subjects {m.get('subjects')} (train {m.get('train')}, val {m.get('val')}, test {m.get('test')}), "
        f"seed {m.get('seed')}. Protocol and definitions: docs/evaluation.md.",
        "",
        f"**Macro AUROC {_fmt(sc.macro)}** (95 % bootstrap CI {_fmt(sc.macro_ci_low)} - {_fmt(sc.macro_ci_high)}, "
        f"{sc.n_macro_labels} label(s)). Attention entropy {_fmt(b.entropy)} "
        f"(pooled {_fmt(b.pooled_entropy)}). Primary readout `{result.readout}`.",
        "",
        f"## Disease probes (test set, readout `{result.readout}`)",
        "",
        _md_table(*tables["probes"]),
        "",
        "## Readouts and baseline rows (test set, same split and probe protocol)",
        "",
        _md_table(*tables["rows"]),
        "",
        "## Missing-organ robustness (test set)",
        "",
        _md_table(*tables["robustness"]),
        "",
        "## Attention balance (all subjects, all organs)",
        "",
        _md_table(*tables["attention"]),
        "",
    ]
    if result.factors is not None:
        f = result.factors
        md += [
            "## What the embedding encodes (latent factors of the synthetic cohort)",
            "",
            f"Ridge R^2 of each factor from the CLS embedding (fit on {f.n_fit}, scored on {f.n_test} subjects); "
            f"nuisance factors (no label reads them): {', '.join(f.nuisance) or 'none'}. "
            f"Mean over the factors the labels read: **{_fmt(f.signal_r2)}**; participation ratio of the "
            f"embedding {_fmt(f.participation_ratio)} directions.",
            "",
            _md_table(["factor", "r2", "nuisance"], [[k, v, k in f.nuisance] for k, v in f.r2.items()]),
            "",
        ]
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n".join(md))
    paths["summary.json"] = out_dir / "summary.json"
    paths["summary.json"].write_text(json.dumps(summary_dict(result), indent=2) + "\n")
    for p in _plots(result, out_dir):
        paths[p.name] = p
    curves = roc_points(result)
    if curves:
        from matplotlib.image import imsave

        from fedpanfm.tb_figures import roc_curves

        paths["roc.png"] = out_dir / "roc.png"
        imsave(paths["roc.png"], roc_curves(curves, f"ROC on the test set, readout {result.readout}"))
    with RunLogger(out_dir, TB_RUN) as tb:
        for step, values in tensorboard_scalars(result).items():
            tb.scalars(values, step)
        from fedpanfm.tb_figures import png_image

        # The report's pictures, where people look (TensorBoard's IMAGES tab).
        for tag, name in TB_IMAGES.items():
            if name in paths:
                tb.image(tag, png_image(paths[name]), 0)
        paths["tensorboard"] = tb.log_dir
    return paths


__all__ = [
    "EvaluationResult",
    "attention_table",
    "evaluate_encoder",
    "probe_table",
    "roc_points",
    "robustness_table",
    "rows_table",
    "summary_dict",
    "tensorboard_scalars",
    "write_report",
]
