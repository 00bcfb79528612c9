"""Per-organ image renderers of the synthetic cohort (our design; docs/synthetic-cohort.md).

Each renderer draws one organ of one subject on a 2D (H, W) or 3D (D, H, W) native grid from
the subject's factors, vectorised in numpy. Coordinates are normalised: every axis spans
[-1, 1] over the native field of view, the last two axes are the image plane and the first axis
of a 3D grid is depth. Anatomy stays inside |v| < 0.8, so a centre crop of the native grid to
80 % of its size (what the loader does when an organ has no target spacing) keeps it whole.

Intensities are in arbitrary MR-like units on a 0-1000 scale before the site's scanner (gain,
offset, bias field, Rician noise) is applied. Dominant organs (heart, adipose) are high-contrast
and their largest variation comes from nuisance factors (body size, cardiac phase); small organs
are low-contrast and carry the disease factors in subtle shape and texture changes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedpanfm.data.synthetic_factors import Scanner

Coords = list[np.ndarray]
Renderer = Callable[[Coords, dict[str, float], np.random.Generator], np.ndarray]


def native_coords(shape: tuple[int, ...]) -> Coords:
    """Voxel-centre coordinates in [-1, 1] per axis, as broadcastable (sparse) arrays."""
    out = []
    for a, n in enumerate(shape):
        v = (np.arange(n) + 0.5) / n * 2.0 - 1.0
        out.append(v.reshape([n if b == a else 1 for b in range(len(shape))]))
    return out


def _plane(cs: Coords) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(depth or None for 2D, row, column) coordinates."""
    return (cs[0] if len(cs) == 3 else None), cs[-2], cs[-1]


def ellipsoid(cs: Coords, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    """Normalised distance (1 on the surface) to an ellipsoid; (depth, row, col) centre and radii.

    On a 2D grid the depth term is dropped: the image is the central slice.
    """
    z, y, x = _plane(cs)
    d2 = ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    if z is not None:
        d2 = d2 + ((z - centre[0]) / radii[0]) ** 2
    return np.sqrt(d2)


def inside(d: np.ndarray, edge: float = 0.08) -> np.ndarray:
    """Soft indicator of ``d < 1`` with a linear ramp of width ``edge`` (partial-volume edges)."""
    return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """A Gaussian random field with unit std and correlation length ``scale`` (share of the FOV)."""
    white = rng.standard_normal(shape)
    # Frequencies in cycles per FOV, so the correlation length does not depend on the grid size.
    axes_f = [np.fft.fftfreq(n) * n for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1]) * shape[-1]]
    k2 = sum(f**2 for f in np.meshgrid(*axes_f, indexing="ij"))
    axes = tuple(range(len(shape)))
    field = np.fft.irfftn(np.fft.rfftn(white) * np.exp(-2.0 * (np.pi * scale) ** 2 * k2), s=shape, axes=axes)
    return field / (field.std() + 1e-12)


def _brain(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    head = ellipsoid(cs, (0, 0, 0), (0.72, 0.66, 0.58))
    # Atrophy: the brain shrinks inside the skull and sulci widen with neurodegeneration and age.
    atrophy = 0.035 * f["neuro"] + 0.02 * f["age"]
    brain = ellipsoid(cs, (0, 0, 0), tuple(r * (0.9 - atrophy) for r in (0.72, 0.66, 0.58)))
    img = 700.0 * inside(head, 0.05) * (1.0 - inside(head / 0.93, 0.05))  # skull
    img += 120.0 * inside(head / 0.93, 0.05)  # CSF under the skull
    gm = inside(brain, 0.05)
    wm = inside(brain / 0.7, 0.08)
    sulci = smooth_noise(rng, shape, 0.04) > 1.4 - 0.25 * f["neuro"] - 0.1 * f["age"]
    cortex = 450.0 + 30.0 * smooth_noise(rng, shape, 0.03)
    img = img * (1 - gm) + gm * np.where(sulci & (wm < 0.5), 120.0, cortex)
    img = img * (1 - wm) + wm * 620.0
    # Lateral ventricles grow with age and neurodegeneration.
    v = float(np.exp(0.12 * f["age"] + 0.1 * f["neuro"]))
    for side in (-1.0, 1.0):
        vent = inside(ellipsoid(cs, (0.05, -0.05, side * 0.11), (0.25 * v, 0.3 * v, 0.07 * v)), 0.1)
        img = img * (1 - vent) + vent * 110.0
    return img


def _heart(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    z, y, x = _plane(cs)
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    # Nuisance with a large visual effect: body size scales everything, the cardiac phase swings
    # the cavity and wall thickness. The disease factors move the wall by a few percent.
    s = float(np.clip(1.0 + 0.14 * f["body_size"], 0.7, 1.2))
    phase = f["cardiac_phase"]
    chest = inside(ellipsoid(cs, (0, 0, 0), (0.9, 0.54 * s, 0.65 * s)), 0.04)
    img = 380.0 * chest
    for side in (-1.0, 1.0):  # lungs
        img -= 330.0 * inside(ellipsoid(cs, (0, -0.05, side * 0.46 * s), (0.8, 0.36 * s, 0.15 * s)), 0.05) * chest
    taper = 1.0 if z is None else np.clip(1.0 - 0.5 * ((z + 0.6) / 1.2) ** 2, 0.3, 1.0)
    outer_r = 0.27 * s * (1.0 - 0.08 * phase) * taper
    wall = (0.22 + 0.18 * phase + 0.035 * f["cardiac"] + 0.02 * f["vascular"]) * outer_r
    r = np.sqrt((y - 0.05) ** 2 + (x + 0.05) ** 2)
    rv = inside(ellipsoid(cs, (0, 0.02, -0.33 * s), (0.9, 0.24 * s * (1 - 0.2 * phase), 0.14 * s)), 0.1)
    img = img * (1 - rv) + rv * 850.0
    myo = inside(r / outer_r, 0.06)
    cavity = inside(r / (outer_r - wall), 0.06)
    fibrosis = 25.0 * f["cardiac"] + 20.0 * smooth_noise(rng, shape, 0.05)
    img = img * (1 - myo) + myo * (220.0 + fibrosis)
    img = img * (1 - cavity) + cavity * 900.0
    return img


def _adipose(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    # Body size dominates: body outline, subcutaneous fat depth and visceral fat all follow it.
    s = float(np.clip(f["body_size"], -2.5, 2.5))
    ry, rx = 0.5 + 0.09 * s, 0.6 + 0.07 * s
    body = ellipsoid(cs, (0, 0.02, 0), (0.95, ry, rx))
    sc = 0.1 + 0.04 * s + 0.01 * f["metabolic"]
    muscle_edge = ellipsoid(cs, (0, 0.02, 0), (0.95, ry - sc, rx - sc))
    cavity = ellipsoid(cs, (0, 0.0, 0), (0.95, ry - sc - 0.06, rx - sc - 0.06))
    vf_share = 1.0 / (1.0 + np.exp(-(-0.6 + 0.8 * s + 0.3 * f["visceral_fat"] + 0.15 * f["metabolic"])))
    field = smooth_noise(rng, shape, 0.05)
    visceral = field > np.quantile(field, 1.0 - 0.6 * vf_share)
    inner = np.where(visceral, 950.0, 380.0)
    img = 1000.0 * inside(body, 0.03)
    img = img * (1 - inside(muscle_edge, 0.03)) + inside(muscle_edge, 0.03) * 300.0
    c = inside(cavity, 0.03)
    img = img * (1 - c) + c * inner
    spine = inside(ellipsoid(cs, (0, 0.55 * ry, 0), (0.95, 0.09, 0.09)), 0.1)
    return img * (1 - spine) + spine * 150.0


def _liver(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    body = inside(ellipsoid(cs, (0, 0, 0), (0.95, 0.78, 0.78)), 0.05)
    liver = inside(ellipsoid(cs, (0, -0.05, -0.1), (0.6, 0.5, 0.6)), 0.08)
    # Fat fraction brightens the liver a little; inflammation makes it patchy.
    fat = 60.0 * np.tanh(f["steatosis"] / 1.5) + 15.0 * f["metabolic"]
    patchy = (12.0 + 6.0 * max(f["inflammatory"], 0.0)) * smooth_noise(rng, shape, 0.05)
    vessels = np.abs(smooth_noise(rng, shape, 0.08)) < 0.12
    tissue = np.where(vessels, 300.0, 440.0 + fat + patchy)
    return 360.0 * body * (1 - liver) + liver * tissue


def _kidney(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    k = 1.0 - 0.06 * f["renal"]
    radii = (0.55 * k, 0.62 * k, 0.36 * k)
    d = ellipsoid(cs, (0, 0, 0), radii)
    hilum = inside(ellipsoid(cs, (0, 0, 0.34 * k), (0.3, 0.22, 0.16)), 0.1)
    kidney = inside(d, 0.08) * (1 - hilum)
    # Cortex thins and cortico-medullary contrast fades with kidney disease.
    cortex_depth = 0.3 - 0.035 * f["renal"] - 0.015 * f["vascular"]
    medulla = inside(d / (1.0 - cortex_depth), 0.1)
    pyramids = 0.5 + 0.5 * np.tanh(smooth_noise(rng, shape, 0.06))
    cmd = 90.0 / (1.0 + np.exp(0.8 * f["renal"]))
    tissue = 500.0 - medulla * pyramids * cmd
    return 340.0 + kidney * (tissue - 340.0) + 250.0 * hilum * inside(d, 0.08)


def _spleen(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    g = float(np.exp(0.1 * f["splenic"] + 0.05 * f["inflammatory"]))
    spleen = inside(ellipsoid(cs, (0, 0, 0.05), (0.5 * g, 0.45 * g, 0.3 * g)), 0.08)
    notch = inside(ellipsoid(cs, (0, 0, 0.35 * g), (0.5, 0.3 * g, 0.2 * g)), 0.08)  # crescent hilum
    organ = spleen * (1 - notch)
    tissue = 500.0 + 10.0 * f["splenic"] + 8.0 * smooth_noise(rng, shape, 0.06)
    return 380.0 + organ * (tissue - 380.0)


def _pancreas(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    z, y, x = _plane(cs)
    shape = np.broadcast_shapes(*(c.shape for c in cs))
    # A curved, lobulated band: thick head on the left, thin tail on the right; atrophies with
    # pancreatic disease and age, darkens and turns heterogeneous with fatty infiltration.
    centre_y = 0.25 * x**2 - 0.08
    radius = 0.14 * (1.0 - 0.07 * f["pancreatic"] - 0.03 * f["age"]) * (1.0 + 0.45 / (1.0 + np.exp((x + 0.35) / 0.08)))
    d2 = ((y - centre_y) / radius) ** 2 + (x / 0.68) ** 8
    if z is not None:
        d2 = d2 + (z / 0.5) ** 2
    lobules = 0.25 * smooth_noise(rng, shape, 0.05)
    organ = inside(np.sqrt(d2) + lobules, 0.1)
    fat = 35.0 * np.tanh(0.5 * f["metabolic"] + 0.3 * f["pancreatic"])
    tissue = 490.0 - fat + (10.0 + 6.0 * max(f["inflammatory"], 0.0)) * smooth_noise(rng, shape, 0.03)
    return 400.0 + organ * (tissue - 400.0)


RENDERERS: dict[str, Renderer] = {
    "brain": _brain,
    "heart": _heart,
    "adipose": _adipose,
    "liver": _liver,
    "kidney": _kidney,
    "spleen": _spleen,
    "pancreas": _pancreas,
}


def apply_scanner(img: np.ndarray, scanner: Scanner, cs: Coords, rng: np.random.Generator) -> np.ndarray:
    """The site's scanner: smooth multiplicative bias field, gain, offset and Rician noise."""
    direction = rng.standard_normal(len(cs))
    direction /= np.linalg.norm(direction) + 1e-12
    ramp = sum(d * c for d, c in zip(direction, cs))
    bowl = sum(c**2 for c in cs) / len(cs)
    bias = np.exp(scanner.bias * (ramp + rng.uniform(-0.5, 0.5) * bowl))
    clean = scanner.gain * img * bias
    sigma = scanner.noise * 1000.0 * scanner.gain
    # Magnitude of a complex signal with Gaussian noise in both channels: MR's Rician noise.
    real = clean + sigma * rng.standard_normal(clean.shape)
    imag = sigma * rng.standard_normal(clean.shape)
    return np.sqrt(real**2 + imag**2) + scanner.offset


def render_organ(
    organ: str, shape: tuple[int, ...], factors: dict[str, float], scanner: Scanner, rng: np.random.Generator
) -> np.ndarray:
    """One organ image of one subject as float32.

    Args:
        organ: organ name (a key of :data:`RENDERERS`).
        shape: the native grid, 2 or 3 sizes.
        factors: the subject's factors, name -> value.
        scanner: the site's scanner.
        rng: the image's own random stream (texture, bias direction, noise).
    """
    if organ not in RENDERERS:
        raise ValueError(f"no synthetic renderer for organ {organ!r}; known: {', '.join(RENDERERS)}")
    if len(shape) not in (2, 3):
        raise ValueError(f"organ {organ!r}: native grid {shape} must have 2 or 3 sizes")
    cs = native_coords(shape)
    img = np.broadcast_to(RENDERERS[organ](cs, factors, rng), shape)
    return apply_scanner(img, scanner, cs, rng).astype(np.float32)
