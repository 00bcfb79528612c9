"""``fedpanfm cohort preview``: what the model sees from one site, before the site joins.

For each subject and organ of a site folder: the preprocessed array (``<out>/<subject>/<organ>.npy``,
float32 (1, *grid), exactly what training reads) and one PNG mosaic per subject
(``<out>/<subject>/mosaic.png``: mid-slices of each organ with orientation labels at the edges).
``<out>/site_table.csv`` lists, per image, the modality, the stored orientation (and obliquity),
shape, spacing and intensity percentiles before and after preprocessing; :func:`format_preview`
prints a per-organ summary. Nothing is written into the site folder (no cache), so it runs on a
read-only copy.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.intensity import resolve_method, resolve_modality
from fedpanfm.data.manifest import CohortError, read_manifest, where
from fedpanfm.data.preprocess import check_dims, preprocess
from fedpanfm.data.readers import load_image

TABLE_NAME = "site_table.csv"
MOSAIC_NAME = "mosaic.png"
PERCENTILES = (1.0, 50.0, 99.0)
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass
class PreviewRow:
    """One image of the site, before and after preprocessing (an empty ``error`` = usable)."""

    subject_id: str
    organ: str
    path: str
    modality: str = ""
    normalize: str = ""
    orientation: str = ""
    obliquity_deg: float = math.nan
    shape_before: str = ""
    spacing_before: str = ""
    shape_after: str = ""
    spacing_after: str = ""
    p1_before: float = math.nan
    p50_before: float = math.nan
    p99_before: float = math.nan
    p1_after: float = math.nan
    p50_after: float = math.nan
    p99_after: float = math.nan
    error: str = ""


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _cell(v: object) -> object:
    """A table cell: floats with 6 significant digits, NaN (not measured) as empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def measure_site(site_dir: Path, cfg: ExperimentConfig) -> Iterator[tuple[PreviewRow, np.ndarray | None, str]]:
    """Every image of a site read and preprocessed as training would: (row, the preprocessed array
    (1, *grid) or None for a left-out image, the world code of each grid axis, e.g. "RAS").

    Bad subjects of the manifest and, with ``cfg.data.on_bad == "skip"``, bad images come as rows
    with ``error`` set; with ``"error"`` a bad image raises :class:`CohortError` naming site, row
    and file. Shared by the preview (which writes the arrays) and the federated cohort statistics
    (fedpanfm/data/site_statistics.py, which keeps aggregates only).

    Args:
        site_dir: the site folder (``manifest.csv`` and its images).
        cfg: the experiment config (organ specs, ``on_bad``).
    """
    site_dir = Path(site_dir)
    manifest = read_manifest(site_dir, cfg.data.organ_set(), cfg.data.on_bad)
    for sid, msg in manifest.bad.items():
        yield PreviewRow(sid, "", "", error=msg), None, ""
    for sid, items in manifest.rows_by_subject().items():
        for number, r in items:
            spec = cfg.data.organs[r.organ]
            row = PreviewRow(sid, r.organ, r.path)
            source = where(site_dir, number, r.path)
            try:
                image = load_image(site_dir / r.path, r.spacing, spec.frame)
                check_dims(image.array.shape, spec, r.organ, source)
                row.modality = resolve_modality(r.modality, image.modality, spec.modality, source)
                out = preprocess(image.array, image.spacing, spec, r.organ, source, row.modality)
            except CohortError as exc:
                if cfg.data.on_bad == "error":
                    msg = str(exc)
                    raise exc if msg.startswith(source) else CohortError(f"{source}: {msg}") from None
                row.error = str(exc)
                yield row, None, ""
                continue
            row.normalize = resolve_method(spec.normalize, row.modality)
            row.orientation, row.obliquity_deg = image.orientation or "as stored (.npy)", round(image.obliquity, 2)
            row.shape_before, row.spacing_before = _fmt(image.array.shape), _fmt([round(s, 4) for s in image.spacing])
            row.shape_after = _fmt(spec.grid)
            row.spacing_after = _fmt(spec.spacing) if spec.spacing else row.spacing_before
            row.p1_before, row.p50_before, row.p99_before = (float(v) for v in np.percentile(image.array, PERCENTILES))
            row.p1_after, row.p50_after, row.p99_after = (float(v) for v in np.percentile(out, PERCENTILES))
            yield row, out, image.axes[: out.ndim - 1]


def preview_site(site_dir: Path, cfg: ExperimentConfig, out_dir: Path) -> list[PreviewRow]:
    """Preprocess every image of a site into ``out_dir`` (module docstring); return the table rows.

    A bad image raises :class:`CohortError` naming site, row and file with ``cfg.data.on_bad ==
    "error"``; with ``"skip"`` it gets a row with ``error`` set and no arrays.

    Args:
        site_dir: the site folder (``manifest.csv`` and its images).
        cfg: the experiment config (organ specs, ``on_bad``).
        out_dir: where the arrays, mosaics and table go (created).
    """
    out_dir = Path(out_dir)
    rows: list[PreviewRow] = []
    panels: list[tuple[str, np.ndarray, str]] = []  # one subject's at a time (images come by subject)
    for row, out, axes in measure_site(site_dir, cfg):
        if panels and rows and row.subject_id != rows[-1].subject_id:
            write_mosaic(out_dir / rows[-1].subject_id / MOSAIC_NAME, rows[-1].subject_id, panels)
            panels = []
        rows.append(row)
        if out is None:
            continue
        (out_dir / row.subject_id).mkdir(parents=True, exist_ok=True)
        np.save(out_dir / row.subject_id / f"{row.organ}.npy", out, allow_pickle=False)
        panels.append((row.organ, out[0], axes))
    if panels:
        write_mosaic(out_dir / rows[-1].subject_id / MOSAIC_NAME, rows[-1].subject_id, panels)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / TABLE_NAME).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(PreviewRow)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in asdict(row).items()})
    return rows


def mid_slices(volume: np.ndarray, axes: str) -> list[tuple[np.ndarray, str, str]]:
    """(plane, horizontal axis code, vertical axis code) for a 2D image or the three mid-planes of a 3D one."""
    if volume.ndim == 2:
        return [(volume, axes[0], axes[1])]
    out = []
    for drop in (2, 1, 0):  # axial, coronal, sagittal for RAS
        keep = [a for a in range(3) if a != drop]
        plane = np.take(volume, volume.shape[drop] // 2, axis=drop)
        out.append((plane, axes[keep[0]], axes[keep[1]]))
    return out


def write_mosaic(path: Path, subject_id: str, panels: list[tuple[str, np.ndarray, str]]) -> None:
    """One row per organ: its mid-slices, each labelled with the patient direction at every edge.

    Args:
        path: the PNG to write.
        subject_id: the title.
        panels: (organ, preprocessed image (*grid), the world code of each grid axis, e.g. "RAS").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(len(mid_slices(img, axes)) for _, img, axes in panels)
    fig = Figure(figsize=(2.4 * cols, 2.4 * len(panels) + 0.4))
    FigureCanvasAgg(fig)
    fig.suptitle(f"{subject_id}: what the model sees")
    for r, (organ, img, axes) in enumerate(panels):
        for c, (plane, h, v) in enumerate(mid_slices(img, axes)):
            ax = fig.add_subplot(len(panels), cols, r * cols + c + 1)
            # Transposed with origin "lower": the first grid axis runs left -> right, the second upward.
            ax.imshow(plane.T, origin="lower", cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for x, y, text in ((1.0, 0.5, h), (0.0, 0.5, _OPPOSITE.get(h, "?")),
                               (0.5, 1.0, v), (0.5, 0.0, _OPPOSITE.get(v, "?"))):
                ax.text(x, y, text, transform=ax.transAxes, color="yellow", fontsize=9, fontweight="bold",
                        ha="center", va="center")
            if c == 0:
                ax.set_ylabel(organ)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def format_preview(site: str, rows: list[PreviewRow]) -> str:
    """Per-organ summary: images, modalities, stored orientations, spacing and median percentiles."""
    good = [r for r in rows if not r.error]
    organs = list(dict.fromkeys(r.organ for r in good))
    header = ["organ", "images", "modality", "normalize", "stored orientation", "spacing before (median)",
              "spacing after", "p1/p50/p99 before", "p1/p50/p99 after"]
    table = []
    for o in organs:
        rs = [r for r in good if r.organ == o]
        spacing = np.median([[float(v) for v in r.spacing_before.split("x")] for r in rs], axis=0)

        def counts(key: str) -> str:
            return ", ".join(f"{k or '?'} {n}" for k, n in Counter(getattr(r, key) for r in rs).most_common())

        def pct(when: str) -> str:
            return "/".join(f"{np.median([getattr(r, f'p{p}_{when}') for r in rs]):.3g}" for p in (1, 50, 99))

        table.append([o, str(len(rs)), counts("modality"), counts("normalize"), counts("orientation"),
                      _fmt([round(float(s), 3) for s in spacing]), rs[0].spacing_after, pct("before"), pct("after")])
    widths = [max(len(x[i]) for x in [header, *table]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [f"site {site!r}: {len(good)} image(s) preprocessed", line(header), line(["-" * w for w in widths])]
    out += [line(t) for t in table]
    bad = [r for r in rows if r.error]
    if bad:
        out += ["", f"left out ({len(bad)}):"] + [f"  {r.subject_id} {r.organ}: {r.error}" for r in bad]
    return "\n".join(out)


__all__ = ["MOSAIC_NAME", "PERCENTILES", "PreviewRow", "TABLE_NAME", "format_preview", "measure_site", "mid_slices",
           "preview_site", "write_mosaic"]
