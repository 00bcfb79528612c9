"""Per-organ image renderers of the synthetic cohort, generator v2 (our design; docs/synthetic-cohort.md).

Each renderer draws one organ of one subject on a 2D (H, W) or 3D (D, H, W) native grid from
the subject's factors, vectorised in numpy. Coordinates are normalised: every axis spans
[-1, 1] over the native field of view, the last two axes are the image plane and the first axis
of a 3D grid is depth. Anatomy stays inside |v| < 0.8 of the plane, so a centre crop to 80 %
keeps it whole.

Why v2: in v1 disease moved organ size and intensity, which a linear probe on raw pixels reads as
well as any encoder can (issue 14: PCA of pixels 0.78, every encoder 0.60-0.78). Here disease
shows only through *spatial structure* that leaves an organ's volume and intensity histogram
unchanged, under per-image nuisance a linear reader cannot undo:

- **texture correlation length** of the organ's parenchyma; the field is rank-matched to the
  same Gaussian marginal whatever its length, so every intensity quantile is unchanged;
- **lesion count** at a fixed total lesion volume (one large lesion or many small ones) at
  random positions;
- **shape irregularity** of the organ outline at exactly constant voxel volume;
- nuisance per image: in-plane rotation, translation, scale, intensity gain, bias field and noise
  (and the site's scanner on top).

Each of these changes no expected pixel value (positions and phases are random), so pixel means,
PCA of pixels and intensity statistics carry (almost) no disease, while a model that recognises
texture scale, blob size or outline roughness reads it directly. The dominant organs (heart,
adipose) stay high-contrast, token-heavy and driven by nuisance (body size, cardiac phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
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


def _shape(cs: Coords) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*(c.shape for c in cs)))


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


def rank_gaussian(field: np.ndarray) -> np.ndarray:
    """``field`` with its values replaced by standard-normal quantiles in the same rank order.

    Why: the marginal of a texture is then exactly the same whatever its correlation length, so
    intensity statistics cannot tell two textures apart; only their spatial structure can.
    """
    flat = field.ravel()
    ranks = np.empty(flat.size)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)

    q = (ranks + 0.5) / flat.size
    return np.interp(q, _QUANTILE_GRID, _NORMAL_QUANTILES).reshape(field.shape)


_QUANTILE_GRID = np.linspace(0.0002, 0.9998, 4001)
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf(float(q)) for q in _QUANTILE_GRID])


# --------------------------------------------------------------------------- disease channels

#: Correlation length (share of the field of view) of a texture at channel value 0, and its
#: log-scale change per unit of the channel: +-2 SD spans about 0.9-5 voxels at 24 voxels.
TEXTURE_LENGTH = 0.09
TEXTURE_SLOPE = 0.45
#: Lesion count exp(LESION_LOG_COUNT + LESION_SLOPE * channel), clipped to [1, LESION_MAX].
LESION_LOG_COUNT = 1.0
LESION_SLOPE = 0.6
LESION_MAX = 10
#: Outline irregularity: amplitude of the smooth radial modulation at channel value z.
IRREGULARITY_BASE = 0.03
IRREGULARITY_RANGE = 0.3


def texture_length(z: float) -> float:
    """Correlation length of the parenchymal texture for channel value ``z``."""
    return TEXTURE_LENGTH * math.exp(TEXTURE_SLOPE * float(np.clip(z, -3.0, 3.0)))


def lesion_count(z: float) -> int:
    """Number of lesions (total lesion volume fixed) for channel value ``z``."""
    return int(np.clip(round(math.exp(LESION_LOG_COUNT + LESION_SLOPE * float(np.clip(z, -3.0, 3.0)))), 1, LESION_MAX))


def irregularity(z: float) -> float:
    """Amplitude of the outline's radial modulation for channel value ``z`` (0 = an ellipse)."""
    return IRREGULARITY_BASE + IRREGULARITY_RANGE / (1.0 + math.exp(-1.6 * float(np.clip(z, -3.0, 3.0))))


def channel(f: dict[str, float], weights: dict[str, float]) -> float:
    """A disease channel: the weighted factors scaled to unit variance for independent factors."""
    if not weights:
        return 0.0
    norm = math.sqrt(sum(w * w for w in weights.values()))
    return sum(w * f[k] for k, w in weights.items()) / norm


# --------------------------------------------------------------------------- pose (nuisance)

#: Per-image pose ranges (our choice: the spread of a patient's position between acquisitions).
MAX_ROTATION_DEG = 25.0
MAX_SHIFT = 0.1
SCALE_LOG_SD = 0.06


def posed(cs: Coords, rng: np.random.Generator, scale: float = 1.0) -> Coords:
    """Coordinates of the organ's own frame: in-plane rotation, shift and scale drawn per image.

    The organ is drawn in the returned frame, so it appears rotated, shifted and scaled on the grid.
    """
    theta = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=len(cs))
    s = scale * math.exp(rng.normal(0.0, SCALE_LOG_SD))
    shape = _shape(cs)
    full = [np.broadcast_to(c, shape) - t for c, t in zip(cs, shift)]
    y, x = full[-2], full[-1]
    c, si = math.cos(theta), math.sin(theta)
    out = [f / s for f in full[:-2]] + [(c * y + si * x) / s, (-si * y + c * x) / s]
    return out


# --------------------------------------------------------------------------- building blocks


def irregular_organ(cs: Coords, centre: tuple[float, float, float], radii: tuple[float, float, float],
                    amplitude: float, rng: np.random.Generator, edge: float = 0.06) -> np.ndarray:
    """Soft mask of an ellipsoid whose outline is roughened by ``amplitude``, at the ellipsoid's volume.

    The normalised distance is modulated by a smooth random field (correlation length 0.12 of the
    field of view); the threshold is then set so that exactly as many voxels lie inside as in the
    plain ellipsoid, so roughness never changes the organ's volume.
    """
    d = ellipsoid(cs, centre, radii)
    # tanh bounds the modulation, so an outline never reaches beyond 1 / (1 - amplitude) radii.
    rough = d * (1.0 + amplitude * np.tanh(smooth_noise(rng, _shape(cs), 0.12)))
    n_in = int((d < 1.0).sum())
    if n_in == 0:
        return inside(rough, edge)
    t = float(np.partition(rough.ravel(), n_in - 1)[n_in - 1]) + 1e-9
    return inside(rough / t, edge)


def texture(rng: np.random.Generator, shape: tuple[int, ...], length: float) -> np.ndarray:
    """Rank-matched Gaussian texture of correlation ``length`` (standard-normal marginal)."""
    return rank_gaussian(smooth_noise(rng, shape, length))


def lesions(cs: Coords, centre: tuple[float, float, float], radii: tuple[float, float, float], count: int,
            volume_share: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask of ``count`` round lesions at random positions inside the ellipsoid.

    Their total volume is ``volume_share`` of the ellipsoid whatever ``count`` is (each radius
    scales as count^(-1/dims)), so count and size trade off at fixed lesion burden.
    """
    dims = len(cs) if len(cs) == 3 else 2
    z, y, x = _plane(cs)
    out = np.zeros(_shape(cs))
    # Radius of one lesion as a share of the organ's (geometric-mean) radius.
    rel = (volume_share / count) ** (1.0 / dims)
    mean_r = float(np.prod(radii[-dims:]) ** (1.0 / dims))
    r = rel * mean_r
    for _ in range(count):
        # Uniform in the inner 70 % of the organ (rejection sampling on the unit ball).
        while True:
            u = rng.uniform(-1.0, 1.0, size=3)
            if dims == 2:
                u[0] = 0.0
            if float(np.sum(u**2)) < 1.0:
                break
        p = [centre[a] + 0.7 * u[a] * radii[a] for a in range(3)]
        d2 = ((y - p[1]) / r) ** 2 + ((x - p[2]) / r) ** 2
        if z is not None:
            d2 = d2 + ((z - p[0]) / r) ** 2
        out = np.maximum(out, inside(np.sqrt(d2), 0.5))
    return out


@dataclass(frozen=True)
class SmallOrgan:
    """One parenchymal organ of generator v2: an ellipsoid with texture, lesions and an outline.

    Args:
        radii: (depth, row, col) radii of the organ in its own frame.
        background: intensity around the organ; tissue: mean parenchymal intensity.
        texture_sd: std of the parenchymal texture; lesion_delta: lesion intensity offset.
        lesion_share: total lesion volume as a share of the organ's.
        texture, lesions, outline: factor weights of the three disease channels.
    """

    radii: tuple[float, float, float]
    background: float
    tissue: float
    texture_sd: float
    lesion_delta: float
    lesion_share: float
    texture: dict[str, float]
    lesions: dict[str, float]
    outline: dict[str, float]

    def render(self, cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
        shape = _shape(cs)
        frame = posed(cs, rng)
        centre = (0.0, 0.0, 0.0)
        organ = irregular_organ(frame, centre, self.radii, irregularity(channel(f, self.outline)), rng)
        tex = texture(rng, shape, texture_length(channel(f, self.texture)))
        spots = lesions(frame, centre, self.radii, lesion_count(channel(f, self.lesions)), self.lesion_share, rng)
        tissue = self.tissue + self.texture_sd * tex + self.lesion_delta * spots
        return self.background + organ * (tissue - self.background)


# Which factors each organ shows, and how (our design; docs/synthetic-cohort.md). Every factor a
# label reads shows in at least one organ, shared factors in several.
SMALL_ORGANS: dict[str, SmallOrgan] = {
    "brain": SmallOrgan((0.55, 0.55, 0.46), 120.0, 520.0, 180.0, 380.0, 0.15,
                        texture={"age": 0.6, "neuro": 0.4}, lesions={"vascular": 0.8, "age": 0.4},
                        outline={"neuro": 1.0}),
    "liver": SmallOrgan((0.5, 0.5, 0.55), 250.0, 520.0, 160.0, -400.0, 0.15,
                        texture={"steatosis": 1.0}, lesions={"inflammatory": 0.8, "metabolic": 0.4},
                        outline={"steatosis": 0.4, "metabolic": 0.6}),
    "kidney": SmallOrgan((0.45, 0.52, 0.34), 260.0, 540.0, 160.0, -400.0, 0.15,
                         texture={"renal": 0.6, "vascular": 0.3}, lesions={"age": 0.6, "vascular": 0.5},
                         outline={"renal": 1.0}),
    "spleen": SmallOrgan((0.45, 0.45, 0.33), 280.0, 560.0, 160.0, -400.0, 0.15,
                         texture={"splenic": 0.8, "inflammatory": 0.3}, lesions={"inflammatory": 0.8},
                         outline={"splenic": 0.8, "inflammatory": 0.3}),
    "pancreas": SmallOrgan((0.4, 0.28, 0.55), 290.0, 540.0, 160.0, -400.0, 0.15,
                           texture={"pancreatic": 1.0}, lesions={"inflammatory": 0.5, "pancreatic": 0.5},
                           outline={"metabolic": 0.8, "age": 0.3}),
}


def _small(organ: str) -> Renderer:
    design = SMALL_ORGANS[organ]
    return lambda cs, f, rng: design.render(cs, f, rng)


def _heart(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    # Nuisance with a large visual effect: body size scales everything, the cardiac phase swings
    # the cavity and wall thickness. Disease shows only in the myocardium's texture and scars.
    shape = _shape(cs)
    s = float(np.clip(1.0 + 0.14 * f["body_size"], 0.7, 1.2))
    frame = posed(cs, rng)
    z, y, x = _plane(frame)
    phase = f["cardiac_phase"]
    chest = inside(ellipsoid(frame, (0, 0, 0), (0.9, 0.54 * s, 0.65 * s)), 0.04)
    img = 380.0 * chest
    for side in (-1.0, 1.0):  # lungs
        img = img - 330.0 * inside(ellipsoid(frame, (0, -0.05, side * 0.46 * s), (0.8, 0.36 * s, 0.15 * s)), 0.05) * chest
    taper = 1.0 if z is None else np.clip(1.0 - 0.5 * ((z + 0.6) / 1.2) ** 2, 0.3, 1.0)
    outer_r = 0.27 * s * (1.0 - 0.08 * phase) * taper
    wall = (0.22 + 0.18 * phase) * outer_r
    r = np.sqrt((y - 0.05) ** 2 + (x + 0.05) ** 2)
    rv = inside(ellipsoid(frame, (0, 0.02, -0.33 * s), (0.9, 0.24 * s * (1 - 0.2 * phase), 0.14 * s)), 0.1)
    img = img * (1 - rv) + rv * 850.0
    myo = inside(r / outer_r, 0.06)
    cavity = inside(r / (outer_r - wall), 0.06)
    fibrosis = 35.0 * texture(rng, shape, texture_length(channel(f, {"cardiac": 1.0, "vascular": 0.4})))
    img = img * (1 - myo) + myo * (220.0 + fibrosis)
    return img * (1 - cavity) + cavity * 900.0


def _adipose(cs: Coords, f: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    # Body size dominates: body outline, subcutaneous fat depth and visceral fat share all follow
    # it. Disease (metabolic) shows only in how finely the visceral fat is dispersed.
    shape = _shape(cs)
    s = float(np.clip(f["body_size"], -2.5, 2.5))
    frame = posed(cs, rng)
    ry, rx = 0.5 + 0.09 * s, 0.6 + 0.07 * s
    body = ellipsoid(frame, (0, 0.02, 0), (0.95, ry, rx))
    sc = 0.1 + 0.04 * s
    muscle_edge = ellipsoid(frame, (0, 0.02, 0), (0.95, ry - sc, rx - sc))
    cavity = ellipsoid(frame, (0, 0.0, 0), (0.95, ry - sc - 0.06, rx - sc - 0.06))
    vf_share = 1.0 / (1.0 + np.exp(-(-0.6 + 0.8 * s)))
    field = smooth_noise(rng, shape, 1.6 * texture_length(channel(f, {"metabolic": 1.0})))
    visceral = field > np.quantile(field, 1.0 - 0.6 * vf_share)
    inner = np.where(visceral, 950.0, 380.0)
    img = 1000.0 * inside(body, 0.03)
    img = img * (1 - inside(muscle_edge, 0.03)) + inside(muscle_edge, 0.03) * 300.0
    c = inside(cavity, 0.03)
    img = img * (1 - c) + c * inner
    spine = inside(ellipsoid(frame, (0, 0.55 * ry, 0), (0.95, 0.09, 0.09)), 0.1)
    return img * (1 - spine) + spine * 150.0


RENDERERS: dict[str, Renderer] = {
    "brain": _small("brain"),
    "heart": _heart,
    "adipose": _adipose,
    "liver": _small("liver"),
    "kidney": _small("kidney"),
    "spleen": _small("spleen"),
    "pancreas": _small("pancreas"),
}

#: Per-image intensity nuisance on top of the site's scanner: log-gain sd and bias-field amplitude.
IMAGE_GAIN_LOG_SD = 0.2
IMAGE_BIAS = 0.15


def apply_scanner(img: np.ndarray, scanner: Scanner, cs: Coords, rng: np.random.Generator) -> np.ndarray:
    """The site's scanner and this acquisition: bias field, gain, offset and Rician noise."""
    direction = rng.standard_normal(len(cs))
    direction /= np.linalg.norm(direction) + 1e-12
    ramp = sum(d * c for d, c in zip(direction, cs))
    bowl = sum(c**2 for c in cs) / len(cs)
    strength = scanner.bias + IMAGE_BIAS * rng.uniform(0.0, 1.0)
    bias = np.exp(strength * (ramp + rng.uniform(-0.5, 0.5) * bowl))
    gain = scanner.gain * math.exp(rng.normal(0.0, IMAGE_GAIN_LOG_SD))
    clean = gain * img * bias
    sigma = scanner.noise * 1000.0 * gain
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
        factors: the subject's (visible) factors, name -> value.
        scanner: the site's scanner.
        rng: the image's own random stream (pose, texture, lesions, bias direction, noise).
    """
    if organ not in RENDERERS:
        raise ValueError(f"no synthetic renderer for organ {organ!r}; known: {', '.join(RENDERERS)}")
    if len(shape) not in (2, 3):
        raise ValueError(f"organ {organ!r}: native grid {shape} must have 2 or 3 sizes")
    cs = native_coords(shape)
    img = np.broadcast_to(RENDERERS[organ](cs, factors, rng), shape)
    return apply_scanner(img, scanner, cs, rng).astype(np.float32)
