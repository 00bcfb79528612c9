"""DICOM as it comes: single files, series folders and enhanced multi-frame files -> a volume.

Every input is reduced to a list of 2D planes, each with its own geometry (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing) and value transform (RescaleSlope / RescaleIntercept or
a Modality LUT). Classic files carry these at the top level; enhanced multi-frame files carry
them in the per-frame functional groups, falling back to the shared ones (PS3.3 C.7.6.16). The
planes are sorted along the slice normal and stacked to an array indexed (slice, row, column)
with its index -> RAS+ affine, ready for :func:`fedpanfm.data.orientation.to_canonical`.

Missing information is never replaced by a silent default (docs/data.md, "DICOM"):

- no PixelSpacing: ImagerPixelSpacing (projection radiographs) with a warning naming the file,
  else an error;
- no ImagePositionPatient / ImageOrientationPatient: an error when planes must be stacked; a
  single 2D image keeps its stored (row, column) order with a warning;
- no rescale for CT or PET, whose values are only physical after it: a warning (values as
  stored); for other modalities a missing rescale means identity (PS3.3 C.11.1);
- MONOCHROME1 (low value = white) is inverted within the stored value range, so bright means
  dense or high signal in every file; CT and PET keep their physical values (HU, activity), which
  a display inversion does not change, with a warning.

Frames at one position in an enhanced file (cine, multi-echo) become a 4th array axis, ordered by
TemporalPositionIndex where present, else by frame order; ``frame`` in the organ's spec picks one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpanfm.data.manifest import CohortError
from fedpanfm.data.orientation import lps_to_ras

log = logging.getLogger(__name__)

#: Modalities whose rescaled values are physical units (HU, activity): never inverted.
QUANTITATIVE = ("CT", "PT")
#: Two planes closer than this along the normal (mm) are at one position.
SAME_POSITION_MM = 1e-3
#: FrameIncrementPointer values that make the frames of a classic multi-frame file time points.
_TIME_POINTERS = {0x00181063, 0x00181065}  # FrameTime, FrameTimeVector


@dataclass
class Plane:
    """One 2D frame with its geometry and value transform."""

    file: Path
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    position: np.ndarray | None  # ImagePositionPatient (LPS mm) of the first voxel
    orientation: np.ndarray | None  # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    slope: float  # NaN: no rescale given
    intercept: float
    temporal: int  # order key among frames at one position
    imager_spacing: bool = False  # pixel_spacing came from ImagerPixelSpacing

    def label(self) -> str:
        return str(self.file) if self.frame is None else f"{self.file} frame {self.frame + 1}"


@dataclass
class DicomVolume:
    """A stacked DICOM image: shape (slices, rows, columns[, frames]) and its RAS+ affine.

    Args:
        shape: the array shape.
        affine: 4x4 map from (slice, row, column) index to RAS+ mm.
        modality: the Modality tag ('' when absent).
        array: float32 voxel values after the value transform; None when read header-only.
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    modality: str
    array: np.ndarray | None = None


def read_dicom(path: Path, pixels: bool = True) -> DicomVolume:
    """A DICOM file (single- or multi-frame) or a series folder as one volume.

    Args:
        path: a DICOM file or a folder holding one series (one slice per file).
        pixels: decode the pixel data; False reads the headers only (shape and geometry).
    """
    path = Path(path)
    if path.is_dir():
        items = [(f, dcmread(f, header_only=not pixels)) for f in series_files(path)]
        _check_one_series(path, items)
        for f, ds in items:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise CohortError(f"{f}: multi-frame file inside a DICOM series folder {path}")
        planes = [_classic_plane(f, ds, None) for f, ds in items]
        source, datasets = path, {f: ds for f, ds in items}
    else:
        ds = dcmread(path, header_only=not pixels)
        planes = _file_planes(path, ds)
        source, datasets = path, {path: ds}
    first = datasets[planes[0].file]
    modality = str(first.get("Modality", "") or "").strip().upper()
    _check_tags(source, planes, modality, datasets)
    order, frames = _stack_order(source, planes, allow_frames=not path.is_dir())
    rows, cols = int(first.Rows), int(first.Columns)
    for f, ds in datasets.items():
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            got = (int(ds.Rows), int(ds.Columns))
            raise CohortError(f"{f}: slice shape {got} differs from {(rows, cols)} in series {source}")
    slices = len(order) // frames
    shape = (slices, rows, cols) + ((frames,) if frames > 1 else ())
    affine = _affine([planes[order[k * frames]] for k in range(slices)], source)
    volume = DicomVolume(shape, affine, modality)
    if pixels:
        volume.array = _pixels(planes, order, shape, datasets, modality)
    return volume


# --------------------------------------------------------------------------- files


def dcmread(path: Path, header_only: bool) -> Any:
    """``pydicom.dcmread`` with every failure as a :class:`CohortError` naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CohortError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise CohortError(f"{path}: DICOM file holds no image (no Rows/Columns)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise CohortError(f"{path}: colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not a scan")
    return ds


def series_files(folder: Path) -> list[Path]:
    """The files of a series folder (hidden files left out), sorted by name."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise CohortError(f"{folder}: DICOM series folder is empty")
    return files


def _check_one_series(folder: Path, items: list[tuple[Path, Any]]) -> None:
    """Stacking is only meaningful for parallel slices of one series with one pixel spacing."""
    f0, ds0 = items[0]
    for f, ds in items[1:]:
        for tag in ("SeriesInstanceUID", "ImageOrientationPatient", "PixelSpacing"):
            a, b = ds0.get(tag), ds.get(tag)
            same = a == b if tag == "SeriesInstanceUID" or a is None or b is None else np.allclose(
                np.asarray(a, float), np.asarray(b, float), atol=1e-4
            )
            if not same:
                raise CohortError(
                    f"{f}: {tag} differs from {f0.name} in DICOM series folder {folder} "
                    "(a series folder must hold parallel slices of one series)"
                )


# --------------------------------------------------------------------------- planes


def _vector(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        v = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) and np.isfinite(v).all() else None


def _spacing(item: Any, path: str) -> tuple[float, float] | None:
    ps = _vector(item.get("PixelSpacing"), 2)
    if ps is None:
        return None
    if (ps <= 0).any():
        raise CohortError(f"{path}: PixelSpacing {list(ps)} must be positive")
    return float(ps[0]), float(ps[1])


def _rescale(item: Any) -> tuple[float, float] | None:
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return None
    return float(slope), float(intercept)


def _classic_plane(f: Path, ds: Any, frame: int | None) -> Plane:
    spacing = _spacing(ds, str(f))
    imager = spacing is None
    if spacing is None:
        detector = _vector(ds.get("ImagerPixelSpacing"), 2)
        ok = detector is not None and (detector > 0).all()
        spacing = (float(detector[0]), float(detector[1])) if detector is not None and ok else (0.0, 0.0)
    slope, intercept = _rescale(ds) or (np.nan, np.nan)
    return Plane(
        f, frame, _vector(ds.get("ImagePositionPatient"), 3), _vector(ds.get("ImageOrientationPatient"), 6),
        spacing, slope, intercept, int(ds.get("InstanceNumber", 0) or 0), imager,
    )


def _group(ds: Any, per_frame: Any, sequence: str) -> Any | None:
    """The first item of a functional group macro: per-frame first, else shared, else None."""
    for groups in (per_frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            return groups[sequence][0]
    return None


def _file_planes(path: Path, ds: Any) -> list[Plane]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
        if per_frame and len(per_frame) < frames:
            raise CohortError(f"{path}: {len(per_frame)} per-frame functional groups for {frames} frames")
        if len(per_frame) > frames:
            # Seen in files cut down from longer ones: item i still describes frame i.
            log.warning("%s: %d per-frame functional groups for %d frame(s); using the first %d",
                        path, len(per_frame), frames, frames)
        planes = []
        for i in range(frames):
            groups = per_frame[i] if per_frame else None
            label = f"{path} frame {i + 1}"
            measures = _group(ds, groups, "PixelMeasuresSequence")
            position = _group(ds, groups, "PlanePositionSequence")
            orient = _group(ds, groups, "PlaneOrientationSequence")
            value = _group(ds, groups, "PixelValueTransformationSequence")
            content = _group(ds, groups, "FrameContentSequence")
            spacing = (_spacing(measures, label) if measures is not None else None) or _spacing(ds, label)
            rescale = (_rescale(value) if value is not None else None) or _rescale(ds)
            temporal = content.get("TemporalPositionIndex") if content is not None else None
            planes.append(Plane(
                path, i,
                _vector(position.get("ImagePositionPatient"), 3) if position is not None else None,
                _vector(orient.get("ImageOrientationPatient"), 6) if orient is not None else None,
                spacing or (0.0, 0.0), *(rescale or (np.nan, np.nan)),
                int(temporal) if temporal is not None else i,
            ))
        return planes
    if frames == 1:
        return [_classic_plane(path, ds, None)]
    # A classic multi-frame file (NM, cine, old US): one geometry for all frames.
    base = _classic_plane(path, ds, None)
    pointer = ds.get("FrameIncrementPointer")
    pointers = set() if pointer is None else {int(p) for p in ([pointer] if isinstance(pointer, int) else pointer)}
    if pointers & _TIME_POINTERS:
        return [Plane(path, i, base.position, base.orientation, base.pixel_spacing, base.slope, base.intercept, i)
                for i in range(frames)]
    step = ds.get("SpacingBetweenSlices")
    if step is None or base.position is None or base.orientation is None or float(step) <= 0:
        raise CohortError(
            f"{path}: multi-frame DICOM without per-frame geometry (no functional groups) and without "
            "SpacingBetweenSlices + ImagePositionPatient + ImageOrientationPatient: cannot tell where its frames are"
        )
    normal = np.cross(base.orientation[:3], base.orientation[3:])
    return [Plane(path, i, base.position + i * float(step) * normal, base.orientation, base.pixel_spacing,
                  base.slope, base.intercept, 0) for i in range(frames)]


def _check_tags(source: Path, planes: list[Plane], modality: str, datasets: dict[Path, Any]) -> None:
    """Errors for geometry a stack needs; one warning per kind of lesser gap, naming the file."""
    stack = len(planes) > 1
    for p in planes:
        if p.pixel_spacing == (0.0, 0.0):
            raise CohortError(f"{p.label()}: no PixelSpacing (nor ImagerPixelSpacing): the voxel size is unknown")
        if stack and (p.position is None or p.orientation is None):
            tag = "ImagePositionPatient" if p.position is None else "ImageOrientationPatient"
            raise CohortError(f"{p.label()}: no {tag}: the planes of {source} cannot be stacked in space")
    first = planes[0]
    ds0 = datasets[first.file]
    if first.imager_spacing:
        log.warning("%s: no PixelSpacing; using ImagerPixelSpacing %s mm (the detector plane, not the patient)",
                    first.file, list(first.pixel_spacing))
    if not stack and (first.position is None or first.orientation is None):
        log.warning("%s: no ImagePositionPatient/ImageOrientationPatient: orientation unknown, "
                    "the image keeps its stored row/column order", first.file)
    unscaled = [p for p in planes if np.isnan(p.slope)]
    if unscaled and modality in QUANTITATIVE and not any(datasets[p.file].get("ModalityLUTSequence") for p in unscaled):
        log.warning("%s: %s without RescaleSlope/RescaleIntercept (%d plane(s)): values kept as stored, "
                    "not physical units", unscaled[0].label(), modality, len(unscaled))
    if str(ds0.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" and modality in QUANTITATIVE:
        log.warning("%s: MONOCHROME1 %s: values kept in physical units (the inversion is for display only)",
                    first.file, modality)


# --------------------------------------------------------------------------- stacking


def _normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _geometry(p: Plane, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """A plane's (position, orientation): stacking needs both (``_check_tags`` refuses planes without)."""
    if p.position is None or p.orientation is None:
        raise CohortError(f"{p.label()}: no ImagePositionPatient/ImageOrientationPatient: the planes of {source} "
                          "cannot be stacked in space")
    return p.position, p.orientation


def _stack_order(source: Path, planes: list[Plane], allow_frames: bool) -> tuple[list[int], int]:
    """Plane indices sorted by position along the normal (then temporal key); frames per position."""
    if len(planes) == 1:
        return [0], 1
    geometry = [_geometry(p, source) for p in planes]
    ref = geometry[0][1]
    for p, (_, orientation) in zip(planes[1:], geometry[1:]):
        if not np.allclose(orientation, ref, atol=1e-4):
            raise CohortError(f"{p.label()}: ImageOrientationPatient differs from the first plane of {source}")
        if not np.allclose(p.pixel_spacing, planes[0].pixel_spacing, rtol=1e-4):
            raise CohortError(f"{p.label()}: PixelSpacing differs from the first plane of {source}")
    normal = _normal(ref)
    along = [float(np.dot(normal, position)) for position, _ in geometry]
    order = sorted(range(len(planes)), key=lambda i: (along[i], planes[i].temporal))
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(along[i] - along[groups[-1][0]]) < SAME_POSITION_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    sizes = {len(g) for g in groups}
    if max(sizes) > 1 and not allow_frames:
        raise CohortError(f"{source}: DICOM series has two slices at the same position")
    if len(sizes) > 1:
        raise CohortError(f"{source}: DICOM frames per position differ ({sorted(sizes)}): incomplete multi-frame stack")
    frames = sizes.pop()
    positions = np.asarray([along[g[0]] for g in groups])
    if len(groups) > 2:
        gaps = np.diff(positions)
        # Uneven gaps mean missing slices; a stack would silently distort the anatomy.
        if gaps.max() > 1.1 * gaps.min():
            raise CohortError(f"{source}: uneven DICOM slice gaps ({gaps.min():g} to {gaps.max():g} mm): missing slices?")
    return [i for g in groups for i in g], frames


def _affine(stack: list[Plane], source: Path) -> np.ndarray:
    """Index (slice, row, column) -> RAS+ mm for planes sorted along their normal."""
    first = stack[0]
    dr, dc = first.pixel_spacing
    if first.orientation is None or first.position is None:
        # Geometry unknown (single 2D image, warned): rows -> x, columns -> y keeps the stored order.
        return np.array([[0, dr, 0, 0], [0, 0, dc, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    # A single plane's slice axis is a singleton, squeezed away: its length never matters.
    step = (stack[-1].position - first.position) / (len(stack) - 1) if len(stack) > 1 else _normal(first.orientation)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_dir * dr  # moving down one row follows the column direction cosines
    lps[:3, 2] = row_dir * dc
    lps[:3, 3] = first.position
    if abs(np.linalg.det(lps[:3, :3])) < 1e-9:
        raise CohortError(f"{source}: degenerate DICOM geometry (ImageOrientationPatient {list(first.orientation)})")
    return lps_to_ras(lps)


# --------------------------------------------------------------------------- pixels


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _values(raw: np.ndarray, plane: Plane, ds: Any, modality: str) -> np.ndarray:
    """Stored values -> modality values (rescale or LUT), MONOCHROME1 inverted unless quantitative."""
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(ds)
    if not np.isnan(plane.slope):
        f = lambda x: np.asarray(x, dtype=np.float64) * plane.slope + plane.intercept  # noqa: E731
    elif ds.get("ModalityLUTSequence"):
        f = lambda x: np.asarray(apply_modality_lut(np.asarray(x, dtype=raw.dtype), ds), dtype=np.float64)  # noqa: E731
    else:
        f = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    out = f(raw)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" and modality not in QUANTITATIVE:
        ends = f(np.array([lo, hi]).astype(raw.dtype))
        out = ends[0] + ends[1] - out
    return out.astype(np.float32)


def _pixels(planes: list[Plane], order: list[int], shape: tuple[int, ...], datasets: dict[Path, Any],
            modality: str) -> np.ndarray:
    decoded: dict[Path, np.ndarray] = {}
    for f, ds in datasets.items():
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise CohortError(f"{f}: DICOM pixel data unreadable ({type(exc).__name__}: {exc})") from None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (frames, int(ds.Rows), int(ds.Columns)) if frames > 1 else (int(ds.Rows), int(ds.Columns))
        if arr.shape != expected:
            raise CohortError(f"{f}: pixel data shape {arr.shape} does not match the header's {expected}")
        decoded[f] = arr
    out = np.empty((len(order), *shape[1:3]), dtype=np.float32)
    for k, i in enumerate(order):
        p = planes[i]
        whole = decoded[p.file]
        raw = whole if whole.ndim == 2 else whole[p.frame]  # a one-frame file decodes to 2D
        out[k] = _values(raw, p, datasets[p.file], modality)
    if len(shape) == 4:  # (slice * frame, r, c) -> (slice, r, c, frame)
        out = np.moveaxis(out.reshape(shape[0], shape[3], *shape[1:3]), 1, -1)
    return out


__all__ = ["DicomVolume", "QUANTITATIVE", "dcmread", "read_dicom", "series_files"]
