"""Turn one organ image into the fixed grid the model sees (per-organ ``OrganSpec``).

The image arrives from ``fedpanfm.data.readers`` in canonical RAS+ order with its spacing. Steps,
in order, all our reconstruction (the papers give no preprocessing; docs/data.md says why):

1. dimensionality check: the image must have as many axes as the organ's grid (a 4D image
   needs ``spec.frame`` to pick one time point / channel, done by the reader);
2. optional foreground crop (``spec.foreground_crop``): the body's bounding box plus
   ``spec.foreground_margin`` mm (``fedpanfm/data/foreground.py``), so the grid holds anatomy
   rather than air and table;
3. resampling to exactly ``spec.spacing`` mm, Gaussian anti-aliasing on downsampled axes
   (``fedpanfm/data/resampling.py``); an empty ``spec.spacing`` keeps the file's voxels;
4. intensity normalisation by modality (``fedpanfm/data/intensity.py``): ``auto`` = CT window
   in HU, MR z-score over the foreground, else z-score over the image. Statistics come from the
   full (resampled) field of view rather than the final crop so that the same anatomy gets the
   same intensities whatever the crop keeps;
5. centre crop / pad to ``spec.grid``. Padding uses the minimum of the normalised image: it is
   the background (air, outside the body) in MR and CT, whereas padding with 0 would paint a
   mean-intensity frame after z-scoring. An odd remainder goes to the end of the axis.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpanfm.config import OrganSpec
from fedpanfm.data.foreground import foreground_box, foreground_mask
from fedpanfm.data.intensity import normalize, resolve_method
from fedpanfm.data.manifest import CohortError
from fedpanfm.data.resampling import resample


def check_dims(shape: tuple[int, ...], spec: OrganSpec, organ: str, source: str) -> None:
    """Raise :class:`CohortError` unless an image of ``shape`` fits the organ's grid rank.

    Args:
        shape: the image shape (singleton axes already squeezed).
        spec: the organ's preprocessing spec.
        organ: the organ name (for the message).
        source: names the file (and site / row) in the message.
    """
    if len(shape) != len(spec.grid):
        hint = f" (set data.organs.{organ}.frame to pick one entry of its 4th axis)" if len(shape) == len(spec.grid) + 1 else ""
        raise CohortError(
            f"{source}: organ {organ!r} needs a {len(spec.grid)}D image (grid {list(spec.grid)}), "
            f"the file holds shape {tuple(shape)} ({len(shape)}D){hint}"
        )


def crop_or_pad(image: torch.Tensor, grid: list[int], fill: float) -> torch.Tensor:
    """Centre crop or pad each axis of ``image`` to ``grid``; pads with ``fill``.

    Args:
        image: tensor of shape (*spatial), same rank as ``grid``.
        grid: target size per axis.
        fill: the padding value.
    """
    out = torch.full(tuple(grid), fill, dtype=image.dtype)
    src, dst = [], []
    for n, g in zip(image.shape, grid):
        if n >= g:
            start = (n - g) // 2
            src.append(slice(start, start + g))
            dst.append(slice(0, g))
        else:
            start = (g - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = image[tuple(src)]
    return out


def preprocess(
    image: np.ndarray,
    spacing: tuple[float, ...],
    spec: OrganSpec,
    organ: str,
    source: str,
    modality: str = "",
) -> np.ndarray:
    """One organ image -> float32 array (1, *spec.grid) (steps in the module docstring).

    Args:
        image: the canonical voxel array from ``load_image`` (singleton axes squeezed).
        spacing: its voxel spacing in mm, one value per axis.
        spec: the organ's preprocessing spec (``cfg.data.organs[organ]``).
        organ: the organ name (for messages).
        source: names the file (and site / row) in error messages.
        modality: the image's resolved modality (``intensity.resolve_modality``); '' = unknown.
    """
    check_dims(image.shape, spec, organ, source)
    if image.size == 0:
        raise CohortError(f"{source}: organ {organ!r}: the image is empty, shape {image.shape}")
    if not np.isfinite(image).all():
        raise CohortError(f"{source}: organ {organ!r}: the image holds NaN or infinite values")
    x = np.ascontiguousarray(image, dtype=np.float32)
    if spec.foreground_crop:
        x = np.ascontiguousarray(x[foreground_box(foreground_mask(x, modality), tuple(spacing), spec.foreground_margin)])
    t = resample(torch.from_numpy(x), tuple(spacing), list(spec.spacing), antialias=spec.antialias)
    method = resolve_method(spec.normalize, modality)
    mask = torch.from_numpy(foreground_mask(t.numpy(), modality)) if method == "foreground_zscore" else None
    t = normalize(t, method, list(spec.clip_percentiles), list(spec.window), mask)
    t = crop_or_pad(t, list(spec.grid), float(t.min()))
    out = t.numpy().astype(np.float32, copy=False)[None]
    if not np.isfinite(out).all():
        raise CohortError(f"{source}: organ {organ!r}: preprocessing produced non-finite values")
    return out


__all__ = ["check_dims", "crop_or_pad", "normalize", "preprocess", "resample"]
