"""A site's ``manifest.csv``: which image file holds which organ of which subject, plus labels.

Layout (docs/architecture.md, "Cohort on disk"): columns ``subject_id,organ,path``, an optional
``spacing`` column (``sx;sy[;sz]`` in mm, read only for ``.npy`` files), an optional ``modality``
column (a DICOM modality code such as ``CT`` or ``MR``; empty = the organ's default), then one column per
disease label holding ``0``, ``1`` or an empty cell for unknown. Every row of a subject repeats
the subject's labels. ``path`` is relative to the site folder.

Row numbers in messages count the header as row 1, as a spreadsheet shows them, so "row 3" is
the second subject row.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedpanfm.organs import OrganSet

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "organ", "path")
SPACING_COLUMN = "spacing"
MODALITY_COLUMN = "modality"
#: A DICOM modality code (CT, MR, PT, ...): the manifest column and ``data.organs.<organ>.modality``.
MODALITY_CODE = re.compile(r"[A-Z0-9]{1,16}")


class CohortError(ValueError):
    """Bad cohort input; the message names the site folder, the manifest row and the file."""


@dataclass
class ManifestRow:
    """One manifest row: one organ image of one subject.

    Args:
        subject_id: the subject's id, unique within the site.
        organ: organ name from the config's organ vocabulary.
        path: image path relative to the site folder (NIfTI file, DICOM series folder or .npy).
        labels: label name -> 0.0 / 1.0, or None where unknown.
        spacing: voxel spacing in mm for ``.npy`` files, one value per axis; None means 1 mm.
        modality: upper-case modality code (``CT``, ``MR``...); ``""`` = not given.
    """

    subject_id: str
    organ: str
    path: str
    labels: dict[str, float | None] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    modality: str = ""


@dataclass
class Manifest:
    """A validated site manifest.

    Args:
        site_dir: the site folder the manifest lives in.
        rows: the valid rows, in file order (rows of bad subjects are left out).
        row_numbers: the manifest row number of each entry of ``rows`` (header = row 1).
        label_names: label columns in file order.
        bad: subject id -> error message, for subjects left out because a row was bad
            (only filled with ``on_bad="skip"``).
    """

    site_dir: Path
    rows: list[ManifestRow]
    row_numbers: list[int]
    label_names: list[str]
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def site(self) -> str:
        return self.site_dir.name

    def subject_ids(self) -> list[str]:
        """Subject ids of the valid rows, in order of first appearance."""
        return list(dict.fromkeys(r.subject_id for r in self.rows))

    def rows_by_subject(self) -> dict[str, list[tuple[int, ManifestRow]]]:
        """Subject id -> [(row number, row), ...] in file order."""
        out: dict[str, list[tuple[int, ManifestRow]]] = {}
        for n, r in zip(self.row_numbers, self.rows):
            out.setdefault(r.subject_id, []).append((n, r))
        return out

    def where(self, row_number: int | None = None, path: str | None = None) -> str:
        """The message prefix naming this site, a row and a file."""
        return where(self.site_dir, row_number, path)


def where(site_dir: Path, row_number: int | None = None, path: str | None = None) -> str:
    """``site 'a' (/x/a), manifest.csv row 3, file img/s1.nii.gz`` (the parts that are known)."""
    text = f"site {site_dir.name!r} ({site_dir})"
    if row_number is not None:
        text += f", {MANIFEST_NAME} row {row_number}"
    if path is not None:
        text += f", file {path}"
    return text


def format_spacing(spacing: tuple[float, ...]) -> str:
    return ";".join(f"{s:g}" for s in spacing)


def parse_spacing(text: str) -> tuple[float, ...]:
    """``"1.5;1.5;3"`` -> (1.5, 1.5, 3.0); raises ValueError on anything but 2-3 positive numbers."""
    parts = [p.strip() for p in text.split(";")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"spacing {text!r}: expected 'sx;sy[;sz]' in mm") from None
    if len(values) not in (2, 3) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {text!r}: expected 2 or 3 positive numbers 'sx;sy[;sz]' in mm")
    return values


def parse_label(text: str) -> float | None:
    """``"1"`` -> 1.0, ``"0"`` -> 0.0, ``""`` -> None; anything else raises ValueError."""
    t = text.strip()
    if t == "":
        return None
    try:
        v = float(t)
    except ValueError:
        v = math.nan
    if v not in (0.0, 1.0):
        raise ValueError(f"label value {text!r} is not 0, 1 or empty")
    return v


def write_manifest(site_dir: Path, rows: list[ManifestRow], label_names: list[str]) -> Path:
    """Write ``site_dir/manifest.csv`` and return its path.

    Args:
        site_dir: the site folder (created if missing).
        rows: the rows to write, in order.
        label_names: label columns, in order; a row's missing or None label is an empty cell.
    """
    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    with_spacing = any(r.spacing is not None for r in rows)
    with_modality = any(r.modality for r in rows)
    header = (list(REQUIRED_COLUMNS) + ([SPACING_COLUMN] if with_spacing else [])
              + ([MODALITY_COLUMN] if with_modality else []) + list(label_names))
    path = site_dir / MANIFEST_NAME
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            cells = [r.subject_id, r.organ, r.path]
            if with_spacing:
                cells.append(format_spacing(r.spacing) if r.spacing is not None else "")
            if with_modality:
                cells.append(r.modality)
            for name in label_names:
                v = r.labels.get(name)
                cells.append("" if v is None else str(int(v)))
            w.writerow(cells)
    return path


def read_manifest(
    site_dir: Path, organs: OrganSet, on_bad: Literal["error", "skip"] = "error"
) -> Manifest:
    """Read and validate ``site_dir/manifest.csv``.

    Structural problems (no manifest, a required column missing, no rows) always raise
    :class:`CohortError`. Row problems (empty cell, unknown organ, duplicate (subject, organ),
    a label that is not 0/1/empty, labels differing between a subject's rows, bad spacing) raise
    with ``on_bad="error"``; with ``on_bad="skip"`` the whole subject is left out and recorded
    in ``Manifest.bad``. Image files are not opened here (see ``SiteDataset``).

    Args:
        site_dir: the site folder.
        organs: the organ vocabulary (``cfg.data.organ_set()``).
        on_bad: ``cfg.data.on_bad``.
    """
    site_dir = Path(site_dir)
    path = site_dir / MANIFEST_NAME
    if not site_dir.is_dir():
        raise CohortError(f"{where(site_dir)}: site folder not found")
    if not path.is_file():
        raise CohortError(f"{where(site_dir)}: empty site: no {MANIFEST_NAME}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        records = list(csv.reader(fh))
    if not records or not any(c.strip() for c in records[0]):
        raise CohortError(f"{where(site_dir)}: {MANIFEST_NAME} is empty (no header)")
    header = [c.strip() for c in records[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CohortError(
            f"{where(site_dir, 1)}: missing required column(s) {', '.join(missing)} "
            f"(header: {','.join(header)})"
        )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes or "" in header:
        raise CohortError(f"{where(site_dir, 1)}: duplicate or empty column name(s) {dupes or ['']}")
    col = {c: i for i, c in enumerate(header)}
    label_names = [c for c in header if c not in REQUIRED_COLUMNS and c not in (SPACING_COLUMN, MODALITY_COLUMN)]

    rows: list[ManifestRow] = []
    numbers: list[int] = []
    bad: dict[str, str] = {}
    seen: dict[tuple[str, str], int] = {}
    first_labels: dict[str, tuple[int, dict[str, float | None]]] = {}

    def fail(subject: str, msg: str) -> None:
        if on_bad == "error":
            raise CohortError(msg)
        bad.setdefault(subject, msg)

    for number, cells in enumerate(records[1:], start=2):
        if not any(c.strip() for c in cells):
            continue  # blank lines carry nothing; spreadsheets often leave one at the end
        subject = cells[col["subject_id"]].strip() if len(cells) > col["subject_id"] else ""
        file_cell = cells[col["path"]].strip() if len(cells) > col["path"] else None
        here = where(site_dir, number, file_cell or None)
        if len(cells) != len(header):
            fail(subject, f"{here}: {len(cells)} cells, the header has {len(header)}")
            continue
        organ = cells[col["organ"]].strip()
        empty = [c for c in REQUIRED_COLUMNS if not cells[col[c]].strip()]
        if empty:
            fail(subject, f"{here}: empty {', '.join(empty)}")
            continue
        if organ not in organs:
            fail(subject, f"{here}: unknown organ {organ!r}; known organs: {', '.join(organs)}")
            continue
        key = (subject, organ)
        if key in seen:
            fail(subject, f"{here}: duplicate row for subject {subject!r}, organ {organ!r} (first at row {seen[key]})")
            continue
        seen[key] = number
        try:
            labels = {name: parse_label(cells[col[name]]) for name in label_names}
        except ValueError as exc:
            bad_col = next(n for n in label_names if _bad_label(cells[col[n]]))
            fail(subject, f"{here}: column {bad_col!r}: {exc}")
            continue
        if subject in first_labels and first_labels[subject][1] != labels:
            fail(subject, f"{here}: labels of subject {subject!r} differ from its row {first_labels[subject][0]}")
            continue
        first_labels.setdefault(subject, (number, labels))
        spacing = None
        if SPACING_COLUMN in col and cells[col[SPACING_COLUMN]].strip():
            try:
                spacing = parse_spacing(cells[col[SPACING_COLUMN]])
            except ValueError as exc:
                fail(subject, f"{here}: {exc}")
                continue
        modality = cells[col[MODALITY_COLUMN]].strip().upper() if MODALITY_COLUMN in col else ""
        if modality and not MODALITY_CODE.fullmatch(modality):
            fail(subject, f"{here}: modality {modality!r} is not a DICOM modality code such as CT or MR")
            continue
        rows.append(ManifestRow(subject, organ, cells[col["path"]].strip(), labels, spacing, modality))
        numbers.append(number)

    if bad:
        keep = [i for i, r in enumerate(rows) if r.subject_id not in bad]
        rows = [rows[i] for i in keep]
        numbers = [numbers[i] for i in keep]
    if not rows and not bad:
        raise CohortError(f"{where(site_dir)}: empty site: {MANIFEST_NAME} has no rows")
    return Manifest(site_dir, rows, numbers, label_names, bad)


def _bad_label(text: str) -> bool:
    try:
        parse_label(text)
    except ValueError:
        return True
    return False
