"""A site's cohort statistics as aggregates only: what a coordinator may see of a site's data.

The per-image table of ``fedpanfm cohort preview`` (spacing, shape, orientation, modality,
intensity percentiles before and after preprocessing) is reduced per organ to numbers no single
subject determines, so a federation can show site heterogeneity without any subject-level value
leaving the site (docs/data.md, "Federated cohort statistics"). Our rules, with ``k`` =
:data:`MIN_CELL` or more (the site's choice; the server may only ask for more):

- **Counts** (subjects, organ coverage, images left out) are released as 0 or >= k, and only
  when the complementary count (the site's subjects minus it) is also 0 or >= k; otherwise the
  cell is withheld (``None``), so no small cell can be read off by subtraction. Where an organ's
  count is withheld, so is every count it could be read from: its quantile blocks carry
  ``n: None`` and its category distributions name the categories (each over >= k images)
  without counts. No site total of images is released (it would give a withheld count back by
  subtraction).
- **Continuous values** (spacing per axis, shape per axis, obliquity, the 1st/50th/99th intensity
  percentiles) are released per organ only over >= k images, as smoothed quantiles: the
  q-quantile is the mean of the k order statistics around rank q (n - 1). Every released
  number is thus a mean over k subjects, never one subject's value (a plain median of an odd
  count, or any minimum or maximum, would be). Values are rounded to 4 significant digits.
- **Categories** (modality, stored orientation, normalisation) are counts per category;
  categories below k are merged into ``other``, and when ``other`` itself is below k (but not 0)
  the whole distribution is withheld.
- What is withheld is listed by name (``withheld``), never with its value.

:func:`check_statistics` is the server's check of a reply (structure, names, sizes, bounds and
the rules above): a site's reply crosses a trust boundary.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the readers (MONAI, torch) load only when a site measures, not for the wire constants
    from fedpanfm.config import ExperimentConfig
    from fedpanfm.data.preview import PreviewRow

VERSION = 1
#: The smallest count of subjects any released number may rest on (a floor no request lowers).
MIN_CELL = 5
#: Quantiles released for each continuous value, as (key, q).
QUANTILES = (("q10", 0.1), ("q50", 0.5), ("q90", 0.9))
#: Continuous values per image and the bounds a plausible one lies within (the server's check).
NUMERIC_BOUNDS: dict[str, tuple[float, float]] = {
    **{f"spacing_mm_{a}": (0.0, 1e4) for a in range(3)},
    **{f"shape_{a}": (1.0, 1e5) for a in range(3)},
    "obliquity_deg": (0.0, 90.0),
    **{f"p{p}_{when}": (-1e7, 1e7) for when in ("before", "after") for p in (1, 50, 99)},
}
#: Categorical fields per image (counts per category).
CATEGORY_FIELDS = ("modality", "orientation", "normalize")
OTHER = "other"
MAX_CATEGORIES = 16
MAX_WITHHELD = 2000
_CATEGORY = re.compile(r"^[A-Za-z0-9 ()._+-]{1,40}$")
_WITHHELD = re.compile(r"^[A-Za-z0-9_./ -]{1,100}$")
_TOP_KEYS = {"version", "min_cell", "subjects", "images_left_out", "organs", "withheld"}
_ORGAN_KEYS = {"subjects", "numeric", "categories"}


class StatisticsError(ValueError):
    """A statistics reply breaks the expected structure or the release rules; the message says where."""


# The wire format of the statistics query (sites/cohort_statistics.py answers it,
# orchestration/cohort_statistics.py sends it): Flower message type ``query.cohort_statistics``;
# the request's ConfigRecord ``fedpanfm`` holds ``min-cell``; the reply's ConfigRecord ``site``
# names the site and ConfigRecord ``cohort-statistics`` holds the statistics as JSON text.
ACTION = "cohort_statistics"
MESSAGE_TYPE = f"query.{ACTION}"
RECORD = "cohort-statistics"
TEXT_KEY = "json"
REQUEST_MIN_CELL = "min-cell"
#: The largest statistics reply the server decodes (bytes of JSON).
MAX_TEXT = 512 * 1024


def statistics_to_text(stats: Mapping[str, Any]) -> str:
    """The reply's JSON text (no NaN: withheld values are ``null``)."""
    return json.dumps(stats, allow_nan=False, separators=(",", ":"))


def statistics_from_text(text: Any, organs: Sequence[str], min_cell: int = MIN_CELL,
                         max_subjects: int = 100_000) -> dict[str, Any]:
    """Decode and :func:`check_statistics` a reply's JSON text (at most :data:`MAX_TEXT` bytes).

    Raises:
        StatisticsError: not text, too long, not JSON (NaN and Infinity refused), or not well formed.
    """
    if not isinstance(text, str) or len(text.encode("utf-8", "replace")) > MAX_TEXT:
        raise StatisticsError(f"statistics: expected JSON text of at most {MAX_TEXT} bytes")

    def no_constants(name: str) -> Any:
        raise StatisticsError(f"statistics: {name} is not a number")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, StatisticsError):
            raise
        raise StatisticsError(f"statistics: not JSON ({exc})") from None
    return check_statistics(obj, organs, min_cell, max_subjects)


def _numeric_values(row: PreviewRow) -> dict[str, float]:
    """The continuous values of one measured image (module docstring), by :data:`NUMERIC_BOUNDS` key."""
    out: dict[str, float] = {}
    for a, v in enumerate(row.spacing_before.split("x")[:3] if row.spacing_before else []):
        out[f"spacing_mm_{a}"] = float(v)
    for a, v in enumerate(row.shape_before.split("x")[:3] if row.shape_before else []):
        out[f"shape_{a}"] = float(v)
    out["obliquity_deg"] = row.obliquity_deg
    for when in ("before", "after"):
        for p in (1, 50, 99):
            out[f"p{p}_{when}"] = float(getattr(row, f"p{p}_{when}"))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def releasable_count(count: int, total: int, k: int) -> int | None:
    """``count`` when it and ``total - count`` are each 0 or >= k, else None (withheld)."""
    ok = lambda c: c == 0 or c >= k  # noqa: E731
    return count if ok(count) and ok(total - count) else None


def smoothed_quantiles(values: Sequence[float], k: int) -> dict[str, float] | None:
    """``{"n", "q10", "q50", "q90"}`` over ``values`` as means of k order statistics (module
    docstring); None for fewer than k values."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n < k:
        return None
    out: dict[str, float] = {"n": n}
    for key, q in QUANTILES:
        start = min(max(int(round(q * (n - 1))) - k // 2, 0), n - k)
        out[key] = _round(float(x[start:start + k].mean()))
    return out


def category_counts(values: Iterable[str], k: int) -> dict[str, int] | None:
    """Counts per category with categories below k merged into ``other``; None when ``other``
    would hold 1..k-1 images (module docstring)."""
    counts = Counter(values)
    out = {c: n for c, n in counts.most_common() if n >= k and c != OTHER}
    other = sum(counts.values()) - sum(out.values())
    if 0 < other < k:
        return None
    if other:
        out[OTHER] = other
    return out


def site_statistics(rows: Iterable[PreviewRow], min_cell: int = MIN_CELL,
                    organs: Sequence[str] = ()) -> dict[str, Any]:
    """The released statistics of one site from its measured images (module docstring).

    Args:
        rows: :func:`~fedpanfm.data.preview.measure_site` rows (usable and left-out images).
        min_cell: the release threshold k (raised to :data:`MIN_CELL` when lower).
        organs: the organ vocabulary: an organ the site has no usable image of is reported with
            ``subjects`` 0 (coverage), not left out.
    """
    k = max(int(min_cell), MIN_CELL)
    rows = list(rows)
    withheld: list[str] = []
    subject_ids = {r.subject_id for r in rows if not r.error}
    n = len(subject_ids)
    left_out = sum(1 for r in rows if r.error)
    if n < k:
        return {"version": VERSION, "min_cell": k, "subjects": None, "images_left_out": None,
                "organs": {}, "withheld": ["site/subjects below min_cell"]}
    images_left_out = left_out if left_out == 0 or left_out >= k else None
    if images_left_out is None:
        withheld.append("images_left_out")
    body: dict[str, Any] = {o: {"subjects": 0, "numeric": {}, "categories": {}} for o in organs}
    for organ in sorted({r.organ for r in rows if not r.error}):
        good = [r for r in rows if not r.error and r.organ == organ]
        with_organ = len({r.subject_id for r in good})
        entry: dict[str, Any] = {"subjects": releasable_count(with_organ, n, k), "numeric": {}, "categories": {}}
        if entry["subjects"] is None:
            withheld.append(f"{organ}/subjects")
        if len(good) < k:
            withheld.append(f"{organ}/images below min_cell")
            body[organ] = entry
            continue
        values: dict[str, list[float]] = {}
        for r in good:
            for key, v in _numeric_values(r).items():
                values.setdefault(key, []).append(v)
        for key in NUMERIC_BOUNDS:
            q = smoothed_quantiles(values.get(key, []), k)
            if q is not None:
                entry["numeric"][key] = q
            elif values.get(key):
                withheld.append(f"{organ}/{key}")
        for field in CATEGORY_FIELDS:
            counts = category_counts((getattr(r, field) or "unknown" for r in good), k)
            if counts is None:
                withheld.append(f"{organ}/{field}")
            else:
                entry["categories"][field] = counts
        if entry["subjects"] is None:  # nothing may give the withheld count back (module docstring)
            for q in entry["numeric"].values():
                q["n"] = None
            entry["categories"] = {f: {c: None for c in counts} for f, counts in entry["categories"].items()}
        body[organ] = entry
    return {"version": VERSION, "min_cell": k, "subjects": n, "images_left_out": images_left_out,
            "organs": dict(sorted(body.items())), "withheld": withheld}


def measure_statistics(site_dir: Path, cfg: ExperimentConfig, min_cell: int = MIN_CELL) -> dict[str, Any]:
    """Read and preprocess every image of ``site_dir`` as training would and release the
    aggregates only (:func:`site_statistics`). Bad images are counted as left out, never raised:
    a site's statistics describe what it holds, including what training would skip."""
    from fedpanfm.data.preview import measure_site

    cfg_skip = cfg if cfg.data.on_bad == "skip" else _with_skip(cfg)
    return site_statistics((row for row, _, _ in measure_site(Path(site_dir), cfg_skip)), min_cell,
                           cfg.data.organ_set().names)


def _with_skip(cfg: ExperimentConfig) -> ExperimentConfig:
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_bad="skip"))


# ----------------------------------------------------------------- the server's check


def _count(v: Any, where: str, hi: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise StatisticsError(f"{where}: {v!r} is not a count in 0..{hi}")
    return v


def check_statistics(obj: Any, organs: Sequence[str], min_cell: int = MIN_CELL,
                     max_subjects: int = 100_000) -> dict[str, Any]:
    """``obj`` when it is a well-formed statistics reply obeying the release rules; else raise.

    Checked: the exact key sets, the version, a ``min_cell`` of at least what was asked, organ
    names from the vocabulary, counts that are integers within bounds and 0 or >= k (with their
    complements), quantile blocks over >= k images with finite values inside
    :data:`NUMERIC_BOUNDS` in order q10 <= q50 <= q90, category names of a safe form, at most
    :data:`MAX_CATEGORIES` per field, each count >= k and their sum the organ's images at most.

    Args:
        obj: the decoded reply.
        organs: the experiment's organ vocabulary.
        min_cell: the k the server asked for.
        max_subjects: the largest site the server accepts (``federation.max_site_subjects``).

    Raises:
        StatisticsError: naming the first offending key.
    """
    if not isinstance(obj, dict) or set(obj) != _TOP_KEYS:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise StatisticsError(f"statistics: keys {got} are not {sorted(_TOP_KEYS)}")
    if obj["version"] != VERSION:
        raise StatisticsError(f"statistics: version {obj['version']!r}, expected {VERSION}")
    k = _count(obj["min_cell"], "min_cell", max_subjects)
    if k is None or k < max(min_cell, MIN_CELL):
        raise StatisticsError(f"statistics: min_cell {obj['min_cell']!r} is below the {max(min_cell, MIN_CELL)} asked for")
    n = _count(obj["subjects"], "subjects", max_subjects)
    if n is not None and n < k:
        raise StatisticsError(f"statistics: subjects {n} below min_cell {k} must be withheld")
    left_out = _count(obj["images_left_out"], "images_left_out", 64 * max_subjects)
    if left_out is not None and 0 < left_out < k:
        raise StatisticsError(f"statistics: images_left_out {left_out} is a small cell (1..{k - 1})")
    withheld = obj["withheld"]
    if not isinstance(withheld, list) or len(withheld) > MAX_WITHHELD or \
            not all(isinstance(w, str) and _WITHHELD.fullmatch(w) for w in withheld):
        raise StatisticsError(f"statistics: withheld must be a list of at most {MAX_WITHHELD} short names")
    body = obj["organs"]
    if not isinstance(body, dict) or (n is None and body):
        raise StatisticsError("statistics: organs must be a mapping (empty when subjects are withheld)")
    for organ, entry in body.items():
        where = f"organs.{organ}"
        if organ not in organs:
            raise StatisticsError(f"{where}: not an organ of the experiment ({', '.join(organs)})")
        if not isinstance(entry, dict) or set(entry) != _ORGAN_KEYS:
            raise StatisticsError(f"{where}: keys must be {sorted(_ORGAN_KEYS)}")
        c = _count(entry["subjects"], f"{where}.subjects", max_subjects)
        assert n is not None  # organs is empty otherwise (checked above)
        if c is not None and (c > n or releasable_count(c, n, k) is None):
            raise StatisticsError(f"{where}.subjects: {c} of {n} is or implies a small cell")
        _check_numeric(entry["numeric"], where, k, n, counted=c is not None)
        _check_categories(entry["categories"], where, k, n, counted=c is not None)
    return obj


def _check_numeric(numeric: Any, where: str, k: int, n: int, counted: bool) -> None:
    if not isinstance(numeric, dict):
        raise StatisticsError(f"{where}.numeric: not a mapping")
    for key, q in numeric.items():
        w = f"{where}.numeric.{key}"
        if key not in NUMERIC_BOUNDS:
            raise StatisticsError(f"{w}: not a released value ({', '.join(NUMERIC_BOUNDS)})")
        if not isinstance(q, dict) or set(q) != {"n", *(name for name, _ in QUANTILES)}:
            raise StatisticsError(f"{w}: keys must be n, {', '.join(name for name, _ in QUANTILES)}")
        count = _count(q["n"], f"{w}.n", n)
        if (count is None) == counted or (count is not None and count < k):
            raise StatisticsError(f"{w}.n: {q['n']!r} images: fewer than min_cell {k}, or a count where the "
                                  "organ's is withheld (or none where it is not)")
        lo, hi = NUMERIC_BOUNDS[key]
        vals = []
        for name, _ in QUANTILES:
            v = q[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise StatisticsError(f"{w}.{name}: {v!r} is not a finite number in [{lo:g}, {hi:g}]")
            vals.append(float(v))
        if vals != sorted(vals):
            raise StatisticsError(f"{w}: quantiles {vals} are not in order")


def _check_categories(categories: Any, where: str, k: int, n: int, counted: bool) -> None:
    if not isinstance(categories, dict) or not set(categories) <= set(CATEGORY_FIELDS):
        raise StatisticsError(f"{where}.categories: a mapping of {', '.join(CATEGORY_FIELDS)}")
    for field, counts in categories.items():
        w = f"{where}.categories.{field}"
        if not isinstance(counts, dict) or not 1 <= len(counts) <= MAX_CATEGORIES:
            raise StatisticsError(f"{w}: 1..{MAX_CATEGORIES} categories expected")
        for name, c in counts.items():
            if not isinstance(name, str) or not _CATEGORY.fullmatch(name):
                raise StatisticsError(f"{w}: category name {str(name)[:60]!r} is not of the expected form")
            count = _count(c, f"{w}.{name}", n)
            if (count is None) == counted or (count is not None and count < k):
                raise StatisticsError(f"{w}.{name}: {c!r} is a small cell (below {k}), or a count where the "
                                      "organ's is withheld (or none where it is not)")
        if counted and sum(counts.values()) > n:
            raise StatisticsError(f"{w}: counts sum to more than the site's {n} subjects")


# ----------------------------------------------------------------- the coordinator's table


def table_rows(by_site: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per site: subjects, images, and per organ its coverage, the medians (q50) of every
    continuous value and the most common category of each field. Withheld cells are empty.

    Returns:
        (column names, rows as column -> value).
    """
    organs = sorted({o for s in by_site.values() for o in s.get("organs", {})})
    columns = ["site", "subjects", "images_left_out", "min_cell"]
    for o in organs:
        columns += [f"{o}/subjects", *(f"{o}/{key}/q50" for key in NUMERIC_BOUNDS),
                    *(f"{o}/{f}" for f in CATEGORY_FIELDS)]
    rows = []
    for site, s in sorted(by_site.items()):
        row: dict[str, Any] = {"site": site, **{c: s.get(c) for c in ("subjects", "images_left_out", "min_cell")}}
        for o, entry in s.get("organs", {}).items():
            row[f"{o}/subjects"] = entry.get("subjects")
            for key, q in entry.get("numeric", {}).items():
                row[f"{o}/{key}/q50"] = q["q50"]
            for f, counts in entry.get("categories", {}).items():
                row[f"{o}/{f}"] = _categories_text(counts)
        rows.append({c: row.get(c) for c in columns})
    # Columns nobody released are left out of the table.
    keep = [c for c in columns if any(r[c] is not None for r in rows)]
    return keep, [{c: r[c] for c in keep} for r in rows]


def _categories_text(counts: Mapping[str, int | None]) -> str:
    return "; ".join(c if m is None else f"{c} {m}" for c, m in counts.items())


def markdown_table(by_site: Mapping[str, Mapping[str, Any]]) -> str:
    """A compact per-site, per-organ text table (TensorBoard's TEXT tab renders markdown)."""
    lines = ["| site | organ | subjects | spacing mm (q50) | shape (q50) | p50 before | p50 after | modality | "
             "orientation |", "|" + " --- |" * 9]

    def q50(entry: Mapping[str, Any], keys: Sequence[str]) -> str:
        vals = [entry["numeric"][k]["q50"] for k in keys if k in entry["numeric"]]
        return "x".join(f"{v:g}" for v in vals) or "-"

    for site, s in sorted(by_site.items()):
        if not s.get("organs"):
            lines.append(f"| {site} | - | {s.get('subjects') if s.get('subjects') is not None else 'withheld'} |"
                         + " - |" * 6)
        for organ, e in sorted(s.get("organs", {}).items()):
            cats = e.get("categories", {})
            lines.append(" | ".join([
                f"| {site}", organ, str(e["subjects"]) if e["subjects"] is not None else "withheld",
                q50(e, [f"spacing_mm_{a}" for a in range(3)]), q50(e, [f"shape_{a}" for a in range(3)]),
                q50(e, ["p50_before"]), q50(e, ["p50_after"]),
                _categories_text(cats.get("modality", {})) or "-",
                _categories_text(cats.get("orientation", {})) or "-",
            ]) + " |")
    return "\n".join(lines)


__all__ = ["ACTION", "MESSAGE_TYPE", "RECORD", "REQUEST_MIN_CELL", "TEXT_KEY", "statistics_from_text",
           "statistics_to_text", "CATEGORY_FIELDS", "MIN_CELL", "NUMERIC_BOUNDS", "QUANTILES", "StatisticsError", "category_counts",
           "check_statistics", "markdown_table", "measure_statistics", "releasable_count", "site_statistics",
           "smoothed_quantiles", "table_rows"]
