"""Pictures of a round for TensorBoard's IMAGES tab, as (H, W, 3) uint8 arrays.

- :func:`organ_bars`: the global organ saliency and the sites' mask rate side by side, one
  pair of bars per organ (what SGM is doing, at a glance).
- :func:`expert_heatmap`: expert usage as a layer x expert grid (collapse or balance of DEX).
- :func:`masked_subjects`: a few subjects' organ mid-slices, with the organs SGM would mask under
  the global saliency framed in red and their masked patches shaded (what the student sees).

Rendered with matplotlib's Agg canvas (no display). Our choice: fixed, small figure sizes
(about 600 px wide), so a round's images cost tens of kilobytes in the event file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

_EXPERT = re.compile(r"^expert_usage/layer(\d+)/e(\d+)$")


def _figure(width: float, height: float):  # noqa: ANN202 - a matplotlib Figure
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _to_array(fig) -> np.ndarray:  # noqa: ANN001 - a matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def organ_bars(saliency: Mapping[str, float], mask_rate: Mapping[str, float], title: str = "") -> np.ndarray:
    """Saliency share and mask rate per organ as grouped bars.

    Args:
        saliency: organ -> global saliency share (sums to 1 over organs).
        mask_rate: organ -> share of present instances masked (organs missing here get no bar).
        title: the figure title, e.g. ``"round 3"``.
    """
    organs = list(saliency) + [o for o in mask_rate if o not in saliency]
    x = np.arange(len(organs))
    fig = _figure(6.0, 2.8)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [saliency.get(o, np.nan) for o in organs], 0.4, label="saliency share", color="#4C72B0")
    ax.bar(x + 0.2, [mask_rate.get(o, np.nan) for o in organs], 0.4, label="mask rate", color="#DD8452")
    ax.set_xticks(x, organs, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, max(0.5, *[v for v in (*saliency.values(), *mask_rate.values()) if np.isfinite(v)]) * 1.1)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "organs", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


def expert_usage_matrix(metrics: Mapping[str, float]) -> np.ndarray:
    """(layers, experts) shares from ``expert_usage/layer<l>/e<e>`` tags; NaN where absent.

    Raises:
        ValueError: no expert-usage tag.
    """
    cells = {(int(m[1]), int(m[2])): float(v) for k, v in metrics.items() if (m := _EXPERT.match(k))}
    if not cells:
        raise ValueError("expert_usage_matrix: no expert_usage/layer<l>/e<e> value")
    out = np.full((max(l for l, _ in cells) + 1, max(e for _, e in cells) + 1), np.nan)
    for (layer, expert), v in cells.items():
        out[layer, expert] = v
    return out


def expert_heatmap(usage: np.ndarray, title: str = "") -> np.ndarray:
    """A layer x expert heatmap of routing shares (each row sums to 1), values written in cells."""
    layers, experts = usage.shape
    fig = _figure(1.6 + 0.6 * experts, 1.2 + 0.45 * layers)
    ax = fig.add_subplot()
    # Colour scale to twice the balanced share at least, so a balanced layer reads mid-scale.
    vmax = max(2.0 / experts, float(np.nanmax(usage)))
    im = ax.imshow(usage, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(usage):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 * vmax else "black")
    ax.set_xticks(range(experts), [f"e{e}" for e in range(experts)], fontsize=8)
    ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)], fontsize=8)
    ax.set_title(title or "expert usage", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _to_array(fig)


def mid_slice(image: torch.Tensor) -> np.ndarray:
    """The 2D view of one organ image (1, *grid): the middle slice of the first axis when 3D."""
    a = image.detach().float().cpu().numpy()[0]
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def patch_grid(mask: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """A (num_patches,) patch mask as a boolean image the size of :func:`mid_slice` of the organ."""
    counts = [g // p for g, p in zip(grid, patch)]
    m = mask.detach().cpu().numpy().reshape(counts)
    if len(grid) == 3:
        m = m[(grid[0] // 2) // patch[0]]
    return np.kron(m, np.ones(tuple(patch[-2:]), dtype=bool)).astype(bool)


def masked_subjects(
    rows: Sequence[tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray | None]]],
    organs: Sequence[str],
    title: str = "",
) -> np.ndarray:
    """Subjects (rows) x organs (columns) of mid-slices; masked organs framed red, masked patches shaded.

    Args:
        rows: per subject ``(subject id, organ -> mid-slice, organ -> patch-mask image or None
            when the whole organ is masked)``; organs the subject lacks are left blank.
        organs: column order.
        title: the figure title.
    """
    fig = _figure(1.2 * len(organs) + 0.6, 1.25 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), len(organs), squeeze=False)
    for r, (subject, slices, masks) in enumerate(rows):
        for c, organ in enumerate(organs):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(organ, fontsize=8)
            if c == 0:
                ax.set_ylabel(subject, fontsize=7)
            if organ not in slices:
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            ax.imshow(slices[organ], cmap="gray")
            if organ in masks and masks[organ] is None:  # the whole organ is hidden from the student
                for s in ax.spines.values():
                    s.set_color("red")
                    s.set_linewidth(3)
                ax.text(0.5, 0.5, "masked", transform=ax.transAxes, ha="center", va="center", color="red", fontsize=8)
            elif (mask := masks.get(organ)) is not None:
                overlay = np.zeros((*mask.shape, 4))
                overlay[mask] = (1.0, 0.3, 0.0, 0.45)
                ax.imshow(overlay)
    fig.suptitle(title or "student view", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str = "") -> np.ndarray:
    """ROC curves, one per label, AUROC in the legend, the chance diagonal dashed.

    Args:
        curves: label -> (false-positive rates, true-positive rates, AUROC).
        title: the figure title.
    """
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_title(title or "ROC (test set)", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _to_array(fig)


def png_image(path) -> np.ndarray:  # noqa: ANN001 - a path
    """A PNG file as (H, W, 3) uint8 (alpha dropped), for :meth:`fedpanfm.tb.RunLogger.image`."""
    from matplotlib.image import imread

    a = imread(str(path))
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


#: The continuous values the heterogeneity picture draws, with their axis labels.
_HETEROGENEITY = (("spacing_mm_0", "spacing, first axis (mm)"), ("p50_before", "median intensity before"),
                  ("p50_after", "median intensity after"))


def cohort_heterogeneity(by_site: Mapping[str, Mapping]) -> np.ndarray:
    """Sites side by side: organ coverage (share of the site's subjects; withheld cells hatched
    grey) and, per organ, each site's q10..q90 range with its q50 for a few values
    (fedpanfm/data/site_statistics.py; nothing below the release threshold is drawn)."""
    sites = sorted(by_site)
    organs = sorted({o for s in by_site.values() for o in s.get("organs", {})})
    fig = _figure(3.0 + 0.7 * len(organs) * (1 + len(_HETEROGENEITY)) / 2, 1.2 + 0.35 * len(sites) + 2.4)
    axes = fig.subplots(1, 1 + len(_HETEROGENEITY), squeeze=False)[0]
    cover = np.full((len(sites), len(organs)), np.nan)
    for i, site in enumerate(sites):
        n = by_site[site].get("subjects")
        for j, organ in enumerate(organs):
            c = by_site[site].get("organs", {}).get(organ, {}).get("subjects")
            if n and c is not None:
                cover[i, j] = c / n
    ax = axes[0]
    ax.imshow(np.isnan(cover), cmap="Greys", vmin=0, vmax=4, aspect="auto")
    im = ax.imshow(np.ma.masked_invalid(cover), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(organs)), organs, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_title("organ coverage (grey: withheld)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    width = 0.8 / max(1, len(sites))
    for ax, (key, label) in zip(axes[1:], _HETEROGENEITY):
        for i, site in enumerate(sites):
            xs, mid, lo, hi = [], [], [], []
            for j, organ in enumerate(organs):
                q = by_site[site].get("organs", {}).get(organ, {}).get("numeric", {}).get(key)
                if q:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    mid.append(q["q50"])
                    lo.append(q["q50"] - q["q10"])
                    hi.append(q["q90"] - q["q50"])
            if xs:
                ax.errorbar(xs, mid, yerr=[lo, hi], fmt="o", markersize=3, capsize=2, label=site)
        ax.set_xticks(range(len(organs)), organs, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{label}: q10-q50-q90", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _to_array(fig)


__all__ = ["cohort_heterogeneity", "expert_heatmap", "expert_usage_matrix", "masked_subjects", "mid_slice", "organ_bars",
           "patch_grid", "png_image", "roc_curves"]
