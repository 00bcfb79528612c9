"""What a site holds: subjects, organ presence and missingness, label prevalence, skipped subjects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.dataset import SiteDataset


@dataclass
class SiteSummary:
    """Counts over one site (or a cohort total).

    Args:
        site: the site folder name (``"total"`` for a cohort total).
        subjects: usable subjects (skipped ones not counted).
        organ_counts: organ -> subjects having it, for every organ of the vocabulary.
        label_positives: label -> subjects with the label = 1.
        label_known: label -> subjects whose label is known (0 or 1).
        skipped: ids of subjects left out as bad input (``cfg.data.on_bad == "skip"``).
    """

    site: str
    subjects: int
    organ_counts: dict[str, int]
    label_positives: dict[str, int] = field(default_factory=dict)
    label_known: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def missing_pct(self) -> dict[str, float]:
        """Organ -> % of subjects without it (0 for an empty site)."""
        n = self.subjects
        return {o: 100.0 * (n - c) / n if n else 0.0 for o, c in self.organ_counts.items()}

    @property
    def prevalence(self) -> dict[str, float]:
        """Label -> positives / known (NaN when no subject's label is known)."""
        return {k: self.label_positives[k] / n if n else math.nan for k, n in self.label_known.items()}


def summarize_site(site_dir: Path, cfg: ExperimentConfig) -> SiteSummary:
    """Validate a site (as training would) and count what it holds; no voxels are read.

    Args:
        site_dir: the site folder.
        cfg: the experiment config (organ vocabulary, ``on_bad`` policy).
    """
    ds = SiteDataset(Path(site_dir), cfg)
    counts = {o: 0 for o in ds.organs}
    positives = {k: 0 for k in ds.label_names}
    known = {k: 0 for k in ds.label_names}
    for i in range(len(ds)):
        for o in ds.organs_of(i):
            counts[o] += 1
        for k, v in ds.labels_of(i).items():
            if not math.isnan(v):
                known[k] += 1
                positives[k] += int(v == 1.0)
    return SiteSummary(ds.site, len(ds), counts, positives, known, list(ds.skipped))


def combine(summaries: list[SiteSummary], name: str = "total") -> SiteSummary:
    """The sum of several site summaries (labels a site lacks count as unknown there)."""
    organs: dict[str, int] = {}
    positives: dict[str, int] = {}
    known: dict[str, int] = {}
    skipped: list[str] = []
    for s in summaries:
        for o, c in s.organ_counts.items():
            organs[o] = organs.get(o, 0) + c
        for k in s.label_known:
            positives[k] = positives.get(k, 0) + s.label_positives[k]
            known[k] = known.get(k, 0) + s.label_known[k]
        skipped += [f"{s.site}/{x}" for x in s.skipped]
    return SiteSummary(name, sum(s.subjects for s in summaries), organs, positives, known, skipped)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def format_summary(summaries: list[SiteSummary], total: bool | None = None) -> str:
    """Plain aligned text tables: organ presence (count and % missing) and label prevalence.

    Args:
        summaries: one summary per site.
        total: add a cohort-total row; None adds it when there is more than one site.
    """
    rows_of = list(summaries)
    if total or (total is None and len(summaries) > 1):
        rows_of.append(combine(summaries))
    organs = list(dict.fromkeys(o for s in rows_of for o in s.organ_counts))
    header = ["site", "subjects", "skipped", *organs]
    rows = [
        [s.site, str(s.subjects), str(len(s.skipped)),
         *(f"{s.organ_counts.get(o, 0)} ({s.missing_pct.get(o, 100.0):.0f}% miss)" for o in organs)]
        for s in rows_of
    ]
    parts = ["organs present (subjects with the organ, % missing)", _table(header, rows)]
    labels = list(dict.fromkeys(k for s in rows_of for k in s.label_known))
    if labels:
        lrows = []
        for s in rows_of:
            cells = []
            for k in labels:
                if k not in s.label_known:
                    cells.append("-")
                    continue
                p, n = s.label_positives[k], s.label_known[k]
                cells.append(f"{p}/{n} ({100 * p / n:.0f}%)" if n else "0/0")
            lrows.append([s.site, *cells])
        parts += ["", "label prevalence (positives / known)", _table(["site", *labels], lrows)]
    skipped = [x for s in summaries for x in ([f"{s.site}/{i}" for i in s.skipped])]
    if skipped:
        parts += ["", f"skipped subjects ({len(skipped)}): {', '.join(skipped)}"]
    return "\n".join(parts)
