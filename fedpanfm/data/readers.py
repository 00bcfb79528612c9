"""Image readers: NIfTI files, DICOM (series folders, single or enhanced multi-frame files) and ``.npy``.

Every reader returns the voxel array as float32 in canonical RAS+ axis order
(``fedpanfm/data/orientation.py``: axis 0 toward the patient's Right, 1 Anterior, 2 Superior,
nearest canonical for oblique scans) plus the voxel spacing in mm, one value per array axis. So
the same physical scan stored in any axis order, or as DICOM, gives the same array. ``.npy``
arrays carry no geometry: they are taken as already in RAS+ order, with the manifest's
``spacing`` (1 mm when the column is empty).

A 4th axis (time, echo, channel) stays the last axis unless ``frame`` picks one of its entries.
Singleton axes are then squeezed (with their spacing entries), so a 2D slice stored as an
(H, W, 1) NIfTI or a single DICOM file is a 2D image.

All errors raise :class:`CohortError` naming the file; ``SiteDataset`` adds the site and row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpanfm.data.dicom import read_dicom, series_files
from fedpanfm.data.manifest import CohortError
from fedpanfm.data.orientation import axis_codes, canonical_geometry, obliquity_deg, spacing_of, to_canonical

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


@dataclass(frozen=True)
class ImageInfo:
    """What can be learned about an image without reading its voxels.

    Args:
        shape: the canonical array shape after frame selection and squeezing singleton axes.
        spacing: voxel spacing in mm per axis of ``shape``.
        orientation: where the stored array's axes point (``"LPS"``, ``"LAS"``...); ``""`` for .npy.
        modality: the DICOM Modality tag (``""`` for other formats or when absent).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str = ""
    modality: str = ""


@dataclass
class Image:
    """A canonical image (see the module docstring) and where it came from.

    Args:
        array: float32 voxels, canonical RAS+ order, frame selected, singleton axes squeezed.
        spacing: mm per axis of ``array``.
        affine: 4x4 index -> RAS+ mm of the canonical array before squeezing (3 spatial axes).
        orientation: axis codes of the stored array (``""`` for .npy).
        obliquity: largest angle (degrees) between a stored axis and its canonical world axis.
        modality: the DICOM Modality tag, else ``""``.
        axes: the world direction each axis of ``array`` points to (``"RAS"``; ``"RA"`` for an
            axial slice; ``"RAS"`` + ``"F"`` for a kept 4th axis of frames).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    orientation: str = ""
    obliquity: float = 0.0
    modality: str = ""
    axes: str = "RAS"


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
        stats = [f.stat() for f in series_files(path)]
        return max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats)
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_image(path: Path, npy_spacing: tuple[float, ...] | None = None, frame: int = -1) -> Image:
    """Read an image in canonical RAS+ order (module docstring), with its geometry.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a DICOM file, a DICOM series folder or a ``.npy`` file.
        npy_spacing: spacing for ``.npy`` files (the manifest's ``spacing`` column); None = 1 mm.
        frame: index along a 4th axis (time point, echo, channel) to keep; -1 keeps the axis.
    """
    path = _existing(path)
    kind = image_kind(path)
    modality = ""
    if kind == "nifti":
        img = _load_nifti(path)
        try:
            arr = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as exc:
            raise CohortError(f"{path}: NIfTI voxel data unreadable ({type(exc).__name__}: {exc})") from None
        arr, affine = _as_volume(arr, path), _nifti_affine(img, path)
    elif kind == "npy":
        arr = _as_volume(_load_npy(path, mmap=False), path)
        affine = np.diag([*_npy_spacing(path, arr.shape[:3], npy_spacing), 1.0])
    else:
        volume = read_dicom(path, pixels=True)
        if volume.array is None:  # read_dicom(pixels=True) always decodes; a broken promise is a bug
            raise RuntimeError(f"{path}: read_dicom returned no voxel data")
        arr, affine, modality = volume.array, volume.affine, volume.modality
    stored = axis_codes(affine) if kind != "npy" else ""
    arr, affine = to_canonical(np.asarray(arr, dtype=np.float32), affine)
    spacing = spacing_of(affine) + (1.0,) * (arr.ndim - 3)
    arr = _pick_frame(arr, frame, path)
    axes = "".join(c for c, n in zip("RASF", arr.shape) if n != 1)
    arr, squeezed = _squeeze(arr, spacing[: arr.ndim])
    return Image(arr, squeezed, affine, stored, obliquity_deg(affine), modality, axes)


def read_image(
    path: Path, npy_spacing: tuple[float, ...] | None = None, frame: int = -1
) -> tuple[np.ndarray, tuple[float, ...]]:
    """(float32 canonical array, spacing in mm per axis): :func:`load_image` without the geometry."""
    image = load_image(path, npy_spacing, frame)
    return image.array, image.spacing


def probe_image(path: Path, npy_spacing: tuple[float, ...] | None = None, frame: int = -1) -> ImageInfo:
    """Shape and spacing from the header only (NIfTI header, DICOM tags, ``.npy`` header).

    Catches missing, corrupt and wrong-dimension files before training without reading voxels.

    Args:
        path: as for :func:`load_image`.
        npy_spacing: as for :func:`load_image`.
        frame: as for :func:`load_image`.
    """
    path = _existing(path)
    kind = image_kind(path)
    modality = ""
    if kind == "nifti":
        img = _load_nifti(path)
        shape, affine = _volume_shape(tuple(int(s) for s in img.shape), path), _nifti_affine(img, path)
    elif kind == "npy":
        shape = _volume_shape(tuple(_load_npy(path, mmap=True).shape), path)
        affine = np.diag([*_npy_spacing(path, shape[:3], npy_spacing), 1.0])
    else:
        volume = read_dicom(path, pixels=False)
        shape, affine, modality = volume.shape, volume.affine, volume.modality
    stored = axis_codes(affine) if kind != "npy" else ""
    spatial, canonical = canonical_geometry(shape, affine)
    spacing = spacing_of(canonical) + (1.0,) * (len(shape) - 3)
    if frame >= 0 and len(spatial) == 4:
        _check_frame(frame, spatial[3], path)
        spatial, spacing = spatial[:3], spacing[:3]
    keep = [i for i, n in enumerate(spatial) if n != 1]
    return ImageInfo(tuple(spatial[i] for i in keep), tuple(float(spacing[i]) for i in keep), stored, modality)


# --------------------------------------------------------------------------- helpers


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CohortError(f"{path}: image file not found")
    return path


def _volume_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """3 spatial axes (2D padded with a singleton) plus at most one more non-singleton axis."""
    shape = tuple(shape) + (1,) * (3 - len(shape))
    extra = [n for n in shape[3:] if n != 1]
    if len(extra) > 1:
        raise CohortError(f"{path}: shape {shape} has {len(extra)} non-singleton axes beyond the 3 spatial ones")
    return shape[:3] + tuple(extra)


def _as_volume(arr: np.ndarray, path: Path) -> np.ndarray:
    return arr.reshape(_volume_shape(arr.shape, path))


def _pick_frame(arr: np.ndarray, frame: int, path: Path) -> np.ndarray:
    if frame < 0 or arr.ndim == 3:
        return arr
    _check_frame(frame, arr.shape[3], path)
    return arr[..., frame]


def _check_frame(frame: int, frames: int, path: Path) -> None:
    if frame >= frames:
        raise CohortError(f"{path}: frame {frame} asked for, the image has {frames} along its 4th axis")


def _squeeze(arr: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    return arr.reshape([arr.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise CohortError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


def _nifti_affine(img, path: Path) -> np.ndarray:
    """The image's affine; zero voxel sizes and an unknown orientation are never guessed silently."""
    from nibabel.openers import ImageOpener

    spatial = min(3, len(img.shape))
    # nibabel replaces a zero pixdim by 1 while loading; the raw header tells what the file says.
    with ImageOpener(str(path)) as fobj:
        raw = type(img.header).from_fileobj(fobj, check=False)
    zooms = tuple(float(z) for z in raw["pixdim"][1 : 1 + spatial])
    if not all(np.isfinite(z) and z != 0 for z in zooms):
        raise CohortError(f"{path}: NIfTI header voxel size (pixdim) {zooms} is zero or not finite: the voxel size is unknown")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CohortError(f"{path}: NIfTI affine is singular or not finite: {affine[:3].tolist()}")
    header = img.header
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        log.warning("%s: NIfTI with qform_code = sform_code = 0: orientation unknown, using nibabel's "
                    "default affine (%s)", path, axis_codes(affine))
    return affine


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


__all__ = ["Image", "ImageInfo", "file_signature", "image_kind", "load_image", "probe_image", "read_image"]
