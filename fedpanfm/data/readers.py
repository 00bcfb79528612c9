"""Image readers: NIfTI files, DICOM (series folders or single files) and ``.npy`` arrays.

Every reader returns the voxel array as float32 plus the voxel spacing in mm, one value per
array axis. Arrays keep the file's own axis order (NIfTI: i, j, k; DICOM series: slice, row,
column); there is no reorientation. This is our choice: a site is expected to export one organ
in one orientation, and the organ tokenizers are learned per organ. Singleton axes are squeezed
(with their spacing entries), so a 2D slice stored as an (H, W, 1) NIfTI is a 2D image.

All errors raise :class:`CohortError` naming the file; ``SiteDataset`` adds the site and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpanfm.data.manifest import CohortError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


@dataclass(frozen=True)
class ImageInfo:
    """What can be learned about an image without reading its voxels.

    Args:
        shape: the array shape after squeezing singleton axes.
        spacing: voxel spacing in mm per axis of ``shape``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def image_kind(path: Path) -> str:
    """``"nifti"``, ``"dicom_series"``, ``"dicom"`` or ``"npy"``; raises for anything else."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom_series"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    raise CohortError(
        f"{path}: unsupported image format {path.suffix!r}; expected .nii, .nii.gz, .npy, "
        ".dcm or a DICOM series folder"
    )


def file_signature(path: Path) -> tuple[int, int]:
    """(mtime in ns, size in bytes) of a file, or the newest mtime and total size of a folder.

    Part of the preprocessing cache key: a changed file changes its signature.
    """
    if not path.exists():
        raise CohortError(f"{path}: image file not found")
    if path.is_dir():
        files = _series_files(path)
        stats = [f.stat() for f in files]
        return max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats)
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def read_image(path: Path, npy_spacing: tuple[float, ...] | None = None) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read an image as (float32 array, spacing in mm per axis), singleton axes squeezed.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a DICOM file, a DICOM series folder or a ``.npy`` file.
        npy_spacing: spacing for ``.npy`` files (the manifest's ``spacing`` column); None = 1 mm.
    """
    path = Path(path)
    if not path.exists():
        raise CohortError(f"{path}: image file not found")
    kind = image_kind(path)
    if kind == "nifti":
        arr, spacing = _read_nifti(path)
    elif kind == "npy":
        arr = _load_npy(path, mmap=False)
        spacing = _npy_spacing(path, arr.shape, npy_spacing)
    elif kind == "dicom":
        arr, spacing = _read_dicom_file(path)
    else:
        arr, spacing = _read_dicom_series(path)
    arr = np.asarray(arr, dtype=np.float32)
    return _squeeze(arr, spacing)


def probe_image(path: Path, npy_spacing: tuple[float, ...] | None = None) -> ImageInfo:
    """Shape and spacing from the header only (NIfTI header, DICOM tags, ``.npy`` header).

    Catches missing, corrupt and wrong-dimension files before training without reading voxels.

    Args:
        path: as for :func:`read_image`.
        npy_spacing: as for :func:`read_image`.
    """
    path = Path(path)
    if not path.exists():
        raise CohortError(f"{path}: image file not found")
    kind = image_kind(path)
    if kind == "nifti":
        img = _load_nifti(path)
        shape, spacing = tuple(int(s) for s in img.shape), _zooms(img, len(img.shape))
    elif kind == "npy":
        shape = _load_npy(path, mmap=True).shape
        spacing = _npy_spacing(path, shape, npy_spacing)
    elif kind == "dicom":
        ds = _dcmread(path, header_only=True)
        shape = _dicom_frame_shape(ds, path)
        spacing = _dicom_file_spacing(ds, len(shape))
    else:
        slices = _sorted_series(path, header_only=True)
        ds0 = slices[0][1]
        shape = (len(slices), *_dicom_frame_shape(ds0, slices[0][0]))
        if len(shape) != 3:
            raise CohortError(f"{slices[0][0]}: multi-frame file inside a DICOM series folder {path}")
        spacing = (_slice_distance(slices), *_pixel_spacing(ds0))
    keep = [i for i, n in enumerate(shape) if n != 1]
    return ImageInfo(tuple(shape[i] for i in keep), tuple(float(spacing[i]) for i in keep))


# --------------------------------------------------------------------------- helpers


def _squeeze(arr: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    return arr.reshape([arr.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise CohortError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


def _zooms(img, ndim: int) -> tuple[float, ...]:
    zooms = tuple(float(z) for z in img.header.get_zooms()[:ndim])
    # A zero or missing zoom means the header does not know; 1 mm is the NIfTI convention.
    return tuple(z if z > 0 else 1.0 for z in zooms) + (1.0,) * (ndim - len(zooms))


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = _load_nifti(path)
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise CohortError(f"{path}: NIfTI voxel data unreadable ({type(exc).__name__}: {exc})") from None
    return arr, _zooms(img, arr.ndim)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise CohortError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise CohortError(f"{path}: .npy must hold a real numeric array, got dtype {getattr(arr, 'dtype', '?')}")
    return arr


def _npy_spacing(path: Path, shape: tuple[int, ...], given: tuple[float, ...] | None) -> tuple[float, ...]:
    if given is None:
        return (1.0,) * len(shape)
    if len(given) == len(shape):
        return tuple(given)
    # The manifest may give the spacing of the squeezed image (e.g. 2 values for (H, W, 1)).
    squeezed = [i for i, n in enumerate(shape) if n != 1]
    if len(given) == len(squeezed):
        out = [1.0] * len(shape)
        for i, s in zip(squeezed, given):
            out[i] = s
        return tuple(out)
    raise CohortError(f"{path}: spacing {given} has {len(given)} values, the array has shape {tuple(shape)}")


def _dcmread(path: Path, header_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CohortError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise CohortError(f"{path}: DICOM file holds no image (no Rows/Columns)")
    return ds


def _dicom_frame_shape(ds, path: Path) -> tuple[int, ...]:
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise CohortError(f"{path}: colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not a scan")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rc = (int(ds.Rows), int(ds.Columns))
    return (frames, *rc) if frames > 1 else rc


def _pixel_spacing(ds) -> tuple[float, float]:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is None or len(ps) != 2:
        return 1.0, 1.0  # DICOM without PixelSpacing has no physical size; 1 mm keeps pixels as they are
    return float(ps[0]), float(ps[1])


def _dicom_file_spacing(ds, ndim: int) -> tuple[float, ...]:
    rc = _pixel_spacing(ds)
    if ndim == 2:
        return rc
    between = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    return (float(between), *rc)


def _rescaled(ds, path: Path) -> np.ndarray:
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise CohortError(f"{path}: DICOM pixel data unreadable ({type(exc).__name__}: {exc})") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept


def _read_dicom_file(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    ds = _dcmread(path, header_only=False)
    shape = _dicom_frame_shape(ds, path)
    arr = _rescaled(ds, path)
    if arr.shape != shape:
        raise CohortError(f"{path}: pixel data shape {arr.shape} does not match the header's {shape}")
    return arr, _dicom_file_spacing(ds, arr.ndim)


def _series_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise CohortError(f"{folder}: DICOM series folder is empty")
    return files


def _slice_position(ds) -> float | None:
    """Position along the slice normal (from ImagePositionPatient and ImageOrientationPatient)."""
    pos, ori = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if pos is None or len(pos) != 3:
        return None
    if ori is None or len(ori) != 6:
        return float(pos[2])
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def _sorted_series(folder: Path, header_only: bool) -> list[tuple[Path, object]]:
    """(file, dataset) pairs sorted by position along the slice normal, else InstanceNumber."""
    items = [(f, _dcmread(f, header_only)) for f in _series_files(folder)]
    _check_one_series(folder, items)
    positions = [_slice_position(ds) for _, ds in items]
    if all(p is not None for p in positions):
        order = sorted(range(len(items)), key=lambda i: positions[i])
    else:
        missing = [items[i][0] for i, ds in enumerate(items) if ds[1].get("InstanceNumber") is None]
        if missing:
            raise CohortError(f"{missing[0]}: DICOM slice has neither ImagePositionPatient nor InstanceNumber")
        order = sorted(range(len(items)), key=lambda i: int(items[i][1].InstanceNumber))
    return [items[i] for i in order]


def _check_one_series(folder: Path, items: list[tuple[Path, object]]) -> None:
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


def _slice_distance(slices: list[tuple[Path, object]]) -> float:
    positions = [_slice_position(ds) for _, ds in slices]
    if len(slices) > 1 and all(p is not None for p in positions):
        gaps = np.abs(np.diff(np.asarray(positions, float)))
        if gaps.min() <= 1e-6:
            raise CohortError(f"{slices[0][0].parent}: DICOM series has two slices at the same position")
        # Uneven gaps mean missing slices; a stack would silently distort the anatomy.
        if gaps.max() > 1.1 * gaps.min():
            raise CohortError(
                f"{slices[0][0].parent}: uneven DICOM slice gaps ({gaps.min():g} to {gaps.max():g} mm): "
                "missing slices?"
            )
        return float(np.mean(gaps))
    ds0 = slices[0][1]
    return float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    slices = _sorted_series(folder, header_only=False)
    first = slices[0][1]
    shape = _dicom_frame_shape(first, slices[0][0])
    planes = []
    for f, ds in slices:
        if len(_dicom_frame_shape(ds, f)) != 2:
            raise CohortError(f"{f}: multi-frame file inside a DICOM series folder {folder}")
        if _dicom_frame_shape(ds, f) != shape:
            raise CohortError(f"{f}: slice shape {_dicom_frame_shape(ds, f)} differs from {shape} in series {folder}")
        planes.append(_rescaled(ds, f))
    arr = np.stack(planes, axis=0)
    return arr, (_slice_distance(slices), *_pixel_spacing(first))


__all__ = ["ImageInfo", "file_signature", "image_kind", "probe_image", "read_image"]
