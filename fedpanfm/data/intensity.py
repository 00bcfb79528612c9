"""Intensity normalisation, by modality (docs/data.md, "Intensity").

``auto`` picks the method from the image's modality: CT by a fixed HU window per organ (clip to
[low, high], scale to [0, 1]; MONAI's ``ScaleIntensityRange(clip=True)``), because Hounsfield
units are already comparable across scanners and a window keeps that; MR by a z-score over the
foreground (MONAI's ``NormalizeIntensity`` over a mask), because MR intensities have no unit and
the share of air in the field of view would otherwise set the scale; any other or unknown
modality by a z-score over the whole image (the behaviour before modalities existed).

The modality of an image is the manifest's ``modality`` cell, else the file's own (DICOM
Modality), else the organ's configured default; a manifest cell that contradicts the file is an
error.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpanfm.data.manifest import CohortError

METHODS = ("auto", "zscore", "foreground_zscore", "window", "minmax", "percentile", "none")


def resolve_modality(manifest: str, file: str, default: str, source: str) -> str:
    """The image's modality: manifest cell, else the file's tag, else the organ default ('' = unknown).

    Args:
        manifest: the manifest's ``modality`` cell ('' when empty or absent).
        file: the modality the file itself states (DICOM Modality; '' for NIfTI and .npy).
        default: the organ's ``OrganSpec.modality``.
        source: names the file (and site / row) in the error message.
    """
    if manifest and file and manifest != file:
        raise CohortError(f"{source}: manifest.csv says modality {manifest}, the DICOM file says {file}")
    return manifest or file or default


def resolve_method(method: str, modality: str) -> str:
    """``auto`` -> ``window`` for CT, ``foreground_zscore`` for MR, else ``zscore``; others unchanged."""
    if method != "auto":
        return method
    return {"CT": "window", "MR": "foreground_zscore"}.get(modality, "zscore")


def normalize(
    image: torch.Tensor,
    method: str,
    clip_percentiles: list[float],
    window: list[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intensity normalisation; a constant image (or foreground) becomes centred, never divided by 0.

    Args:
        image: float tensor.
        method: ``zscore``, ``foreground_zscore``, ``window``, ``minmax``, ``percentile`` or ``none``
            (``auto`` must be resolved first with :func:`resolve_method`).
        clip_percentiles: [low, high] percentiles for ``percentile``.
        window: [low, high] for ``window``.
        mask: boolean foreground of ``image`` for ``foreground_zscore`` (empty -> whole image).
    """
    if method == "none":
        return image
    if method in ("zscore", "foreground_zscore"):
        if method == "foreground_zscore":
            if mask is None:
                raise ValueError("foreground_zscore needs the foreground mask")
            values = image[mask] if bool(mask.any()) else image
        else:
            values = image
        std = values.std(unbiased=False)
        centred = image - values.mean()
        return centred / std if std > 0 else centred
    if method == "window":
        if window is None or len(window) != 2 or window[0] >= window[1]:
            raise ValueError(f"window needs [low, high] with low < high, got {window}")
        lo, hi = float(window[0]), float(window[1])
        return (image.clamp(lo, hi) - lo) / (hi - lo)
    if method == "percentile":
        lo, hi = np.percentile(image.numpy(), clip_percentiles)
        image = image.clamp(float(lo), float(hi))
    elif method != "minmax":
        raise ValueError(f"unknown normalisation {method!r}")
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else image - low


__all__ = ["METHODS", "normalize", "resolve_method", "resolve_modality"]
