"""The synthetic cohort's generative model without images: latent factors, labels, missingness.

Everything here is OUR design (docs/synthetic-cohort.md), made so that the structure the method
is about exists in data we can ship: disease signal spread over several organs (small ones
included), dominant-organ nuisance factors that say little about disease, and organs missing not
at random. All functions are vectorised over subjects: ``factors`` is a mapping name -> array of
shape (n,), so the label and missingness models can be tested on large samples without rendering.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

Factors = dict[str, np.ndarray]

# Shared factors act on several organs; organ-specific ones on one organ (and through the labels).
SHARED_FACTORS: tuple[str, ...] = ("age", "body_size", "metabolic", "vascular", "inflammatory")
ORGAN_FACTORS: dict[str, tuple[str, ...]] = {
    "brain": ("neuro",),
    "heart": ("cardiac", "cardiac_phase"),
    "adipose": ("visceral_fat",),
    "liver": ("steatosis",),
    "kidney": ("renal",),
    "spleen": ("splenic",),
    "pancreas": ("pancreatic",),
}
# Nuisance factors change the image a lot and no label reads them (the dominant-organ shortcut).
NUISANCE_FACTORS: tuple[str, ...] = ("body_size", "cardiac_phase")

# Loadings of each derived factor on earlier factors; the rest of its variance is its own noise,
# so every Gaussian factor has unit variance up to the (small) correlations among its parents.
_LOADINGS: dict[str, dict[str, float]] = {
    # A weak body-size link: realistic, yet body size alone predicts metabolic disease poorly.
    "metabolic": {"body_size": 0.25},
    "vascular": {"age": 0.35, "metabolic": 0.3},
    "inflammatory": {"metabolic": 0.2},
    "neuro": {"age": 0.45, "vascular": 0.3},
    "cardiac": {"vascular": 0.4, "age": 0.2},
    "visceral_fat": {"metabolic": 0.3},
    "steatosis": {"metabolic": 0.55, "inflammatory": 0.2},
    "renal": {"vascular": 0.45, "metabolic": 0.25, "age": 0.15},
    "splenic": {"inflammatory": 0.5, "steatosis": 0.2},
    "pancreatic": {"metabolic": 0.45, "inflammatory": 0.35, "age": 0.15},
}


@dataclass(frozen=True)
class LabelModel:
    """One binary disease label: ``P(label = 1) = sigmoid(intercept + sum_f weights[f] * factor_f)``.

    Args:
        intercept: logit offset, set so the prevalence lands near ``target_prevalence``.
        weights: factor name -> logistic weight.
        target_prevalence: the prevalence the intercept was tuned for (documentation; tests check it).
    """

    intercept: float
    weights: dict[str, float]
    target_prevalence: float


# Intercepts were tuned on 200k sampled subjects (seed 0) to the target prevalence.
LABELS: dict[str, LabelModel] = {
    "type2_diabetes": LabelModel(-3.43, {"metabolic": 0.9, "pancreatic": 1.1, "steatosis": 0.4}, 0.10),
    "hypertension": LabelModel(-1.84, {"vascular": 1.2, "renal": 0.6, "cardiac": 0.5, "age": 0.4}, 0.25),
    "ckd": LabelModel(-4.42, {"renal": 1.5, "vascular": 0.5, "metabolic": 0.4, "age": 0.3}, 0.06),
    "nafld": LabelModel(-2.30, {"steatosis": 1.5, "metabolic": 0.6, "pancreatic": 0.3}, 0.20),
    "pancreatitis": LabelModel(-4.66, {"pancreatic": 1.0, "inflammatory": 1.0, "splenic": 0.4}, 0.04),
    "dementia": LabelModel(-4.82, {"neuro": 1.5, "age": 0.8, "vascular": 0.4}, 0.05),
    "heart_failure": LabelModel(-4.38, {"cardiac": 1.4, "vascular": 0.5, "renal": 0.5, "age": 0.4}, 0.06),
    "splenomegaly": LabelModel(-4.89, {"splenic": 1.5, "inflammatory": 0.6, "steatosis": 0.4}, 0.04),
    "cardiovascular_disease": LabelModel(
        -2.55, {"vascular": 1.0, "cardiac": 0.6, "renal": 0.3, "metabolic": 0.4}, 0.15
    ),
}
LABEL_NAMES: tuple[str, ...] = tuple(LABELS)
UNKNOWN_LABEL_RATE = 0.03  # share of (subject, label) pairs left unknown


@dataclass(frozen=True)
class Acquisition:
    """One imaging decision: ``P(taken) = sigmoid(intercept - sum_f weights[f] * factor_f)``.

    Args:
        intercept: logit for a subject with all factors at 0.
        weights: factor name -> how strongly a high value of the factor makes the scan LESS likely.
    """

    intercept: float
    weights: dict[str, float]


# Missing not at random (our design): sicker subjects skip sessions, and a fatty / large body
# spoils the small pancreas more often. The abdominal session images adipose, liver, kidney,
# spleen and pancreas together; each organ then passes its own quality check.
SESSIONS: dict[str, Acquisition] = {
    "brain": Acquisition(2.0, {"neuro": 0.9, "age": 0.4}),
    "cardiac": Acquisition(2.5, {"cardiac": 0.7}),
    "abdominal": Acquisition(2.0, {"metabolic": 0.6, "renal": 0.6, "inflammatory": 0.3}),
}
ORGAN_SESSION: dict[str, str] = {
    "brain": "brain", "heart": "cardiac", "adipose": "abdominal", "liver": "abdominal",
    "kidney": "abdominal", "spleen": "abdominal", "pancreas": "abdominal",
}
QUALITY: dict[str, Acquisition] = {
    "brain": Acquisition(4.0, {}), "heart": Acquisition(4.0, {}), "adipose": Acquisition(4.0, {}),
    "liver": Acquisition(3.5, {}), "kidney": Acquisition(3.5, {"renal": 0.3}),
    "spleen": Acquisition(3.5, {}), "pancreas": Acquisition(2.5, {"pancreatic": 0.8, "body_size": 0.5}),
}

# The built-in site mix, cycled over K sites (our design; names go into the site folder names).
SITE_MIX: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("neuro_cardiac", ("brain", "heart")),
    ("abdominal", ("adipose", "liver", "kidney", "spleen", "pancreas")),
    ("full_body", ("brain", "heart", "adipose", "liver", "kidney", "spleen", "pancreas")),
    ("partial", ("heart", "adipose", "liver", "kidney")),
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def child_rng(seed: int, *path: int | str) -> np.random.Generator:
    """A generator keyed by ``seed`` and a path such as (site, subject, "render", organ).

    Keys, not draw order, decide each stream, so outputs do not depend on generation order.
    Strings are hashed with CRC32 (stable across runs, unlike ``hash``).
    """
    keys = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in path]
    return np.random.default_rng(np.random.SeedSequence(keys))


def sample_factors(rng: np.random.Generator, n: int, age_shift: float = 0.0) -> Factors:
    """Latent factors of ``n`` subjects.

    Args:
        rng: the random stream.
        n: number of subjects.
        age_shift: shift of the standardised age (sites differ in age mix: non-IID sites).

    Returns:
        factor name -> float64 array (n,). Gaussian factors are standardised (unit variance,
        mean 0 apart from ``age_shift``); ``cardiac_phase`` is uniform on [0, 1];
        ``age_years`` is ``60 + 8 * age``.
    """
    out: Factors = {
        "age": rng.standard_normal(n) + age_shift,
        "body_size": rng.standard_normal(n),
    }
    for name, parents in _LOADINGS.items():
        own = np.sqrt(max(0.2, 1.0 - sum(w * w for w in parents.values())))
        out[name] = sum(w * out[p] for p, w in parents.items()) + own * rng.standard_normal(n)
    out["cardiac_phase"] = rng.uniform(0.0, 1.0, n)
    out["age_years"] = 60.0 + 8.0 * out["age"]
    return out


def visible_factors(factors: dict[str, float], signal: float) -> dict[str, float]:
    """The factor values the renderers draw: disease factors scaled by ``signal``, nuisance kept.

    Labels always read the true factors; ``signal`` only sets how strongly disease shows in the
    images (``synth.disease_signal``; 0 = invisible), so the same subjects can be rendered with a
    harder or an easier signal while the dominant organs' nuisance variation stays as it is.

    Args:
        factors: one subject's factors, name -> value.
        signal: multiplier of every non-nuisance latent factor.
    """
    scaled = set(SHARED_FACTORS).union(*ORGAN_FACTORS.values()) - set(NUISANCE_FACTORS)
    return {k: v * signal if k in scaled else v for k, v in factors.items()}


def _linear(factors: Factors, weights: dict[str, float]) -> np.ndarray:
    n = len(next(iter(factors.values())))
    return sum((w * factors[f] for f, w in weights.items()), np.zeros(n))


def label_probabilities(factors: Factors) -> dict[str, np.ndarray]:
    """label name -> P(label = 1) for each subject, from :data:`LABELS`."""
    return {name: sigmoid(m.intercept + _linear(factors, m.weights)) for name, m in LABELS.items()}


def sample_labels(rng: np.random.Generator, factors: Factors) -> dict[str, np.ndarray]:
    """label name -> float array (n,) of 0 / 1, NaN where the label is unknown."""
    out = {}
    for name, p in label_probabilities(factors).items():
        y = (rng.uniform(size=p.shape) < p).astype(np.float64)
        y[rng.uniform(size=p.shape) < UNKNOWN_LABEL_RATE] = np.nan
        out[name] = y
    return out


def presence_probabilities(factors: Factors, organs: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """organ -> P(organ imaged | its site scans it) = P(session taken) * P(organ passes quality)."""
    sess = {s: sigmoid(a.intercept - _linear(factors, a.weights)) for s, a in SESSIONS.items()}
    return {
        o: sess[ORGAN_SESSION[o]] * sigmoid(QUALITY[o].intercept - _linear(factors, QUALITY[o].weights))
        for o in organs
    }


def sample_presence(
    rng: np.random.Generator, factors: Factors, organs: tuple[str, ...] | list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Which of a site's ``organs`` each subject has, missing not at random.

    The session draw is shared by the organs of one session (one abdominal scan images five
    organs), then each organ passes its own quality check. A subject left with no organ keeps
    the organ it was most likely to have (every subject keeps at least one organ).

    Returns:
        (organ -> bool array (n,) present, bool array (n,) True where the floor restored an organ).
    """
    n = len(next(iter(factors.values())))
    sess_draw = {s: rng.uniform(size=n) for s in SESSIONS}
    sess_taken = {s: sess_draw[s] < sigmoid(a.intercept - _linear(factors, a.weights)) for s, a in SESSIONS.items()}
    present = {}
    for o in organs:
        ok = rng.uniform(size=n) < sigmoid(QUALITY[o].intercept - _linear(factors, QUALITY[o].weights))
        present[o] = sess_taken[ORGAN_SESSION[o]] & ok
    stacked = np.stack([present[o] for o in organs])
    restored = ~stacked.any(axis=0)
    if restored.any():
        probs = np.stack([p for p in presence_probabilities(factors, organs).values()])
        best = probs.argmax(axis=0)
        for i in np.flatnonzero(restored):
            present[organs[best[i]]][i] = True
    return present, np.asarray(restored)


def sample_independent_presence(
    rng: np.random.Generator, n: int, organs: tuple[str, ...] | list[str], rate: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Which of a site's ``organs`` each subject has, each present with probability ``rate``
    independently of every factor (evaluation cohorts: presence says nothing about disease).

    A subject left with no organ keeps one drawn uniformly from ``organs``.

    Returns:
        (organ -> bool array (n,) present, bool array (n,) True where the floor restored an organ).
    """
    present = {o: rng.uniform(size=n) < rate for o in organs}
    restored = ~np.stack([present[o] for o in organs]).any(axis=0)
    pick = rng.integers(0, len(organs), size=n)
    for i in np.flatnonzero(restored):
        present[organs[pick[i]]][i] = True
    return present, np.asarray(restored)


@dataclass(frozen=True)
class Scanner:
    """One site's scanner: what makes the same subject look different at another site.

    Args:
        gain: multiplicative intensity scale.
        offset: additive intensity offset.
        noise: Rician noise std as a share of the full intensity range (1000).
        bias: strength of the smooth multiplicative bias field (log-scale amplitude).
        age_shift: the site's shift in standardised age (its population, not its scanner).
    """

    gain: float
    offset: float
    noise: float
    bias: float
    age_shift: float


def sample_scanner(rng: np.random.Generator) -> Scanner:
    return Scanner(
        gain=float(np.exp(rng.normal(0.0, 0.15))),
        offset=float(rng.normal(0.0, 20.0)),
        noise=float(rng.uniform(0.015, 0.05)),
        bias=float(rng.uniform(0.05, 0.3)),
        age_shift=float(rng.normal(0.0, 0.3)),
    )


def check_renderable(organs: Iterable[str], key: str) -> None:
    """Raise ``ValueError`` naming ``key`` when an organ in ``organs`` has no renderer."""
    unknown = [o for o in organs if o not in ORGAN_FACTORS]
    if unknown:
        raise ValueError(
            f"{key}: the synthetic cohort cannot render {', '.join(unknown)} "
            f"(renderers exist for {', '.join(ORGAN_FACTORS)})"
        )


def site_protocols(sites: int, site_organs: list[list[str]]) -> list[tuple[str, tuple[str, ...]]]:
    """(name, organs) per site: ``site_organs`` when given (one list per site), else the mix.

    Raises:
        ValueError: ``site_organs`` has the wrong length, an empty set, or an organ with no renderer.
    """
    if not site_organs:
        return [SITE_MIX[k % len(SITE_MIX)] for k in range(sites)]
    if len(site_organs) != sites:
        raise ValueError(
            f"synth.site_organs lists {len(site_organs)} sites but synth.sites = {sites}; "
            "give one organ list per site, or [] for the built-in mix"
        )
    out = []
    for k, organs in enumerate(site_organs):
        if not organs:
            raise ValueError(f"synth.site_organs[{k}] is empty: every site scans at least one organ")
        check_renderable(organs, f"synth.site_organs[{k}]")
        named = [name for name, mix in SITE_MIX if set(mix) == set(organs)]
        out.append((named[0] if named else "custom", tuple(dict.fromkeys(organs))))
    return out
