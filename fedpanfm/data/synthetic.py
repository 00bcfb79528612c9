"""The synthetic cohort: K site folders of NIfTI images, manifests and a ground-truth file.

``generate_cohort(out_dir, cfg)`` writes ``cfg.synth.sites`` site folders
(``site_00_neuro_cardiac``, ...) each holding ``images/*.nii.gz`` and ``manifest.csv``, plus
``cohort_metadata.json`` at the cohort root with the ground truth (latent factors, which organs
were dropped by missingness and which by the site's protocol, label definitions). Training never
reads the metadata; it is for evaluation. The generative model is OUR design:
docs/synthetic-cohort.md, :mod:`fedpanfm.data.synthetic_factors` and
:mod:`fedpanfm.data.synthetic_render`.

Each organ is written at a native resolution about 1.25x its target grid, with its own voxel
spacing in the NIfTI header, so the loader's resampling (or centre crop when the organ has no
target spacing) does real work. Every random stream is keyed by (seed, site, subject, organ), so
the same seed gives byte-identical files whatever the generation order.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedpanfm.config import ExperimentConfig, OrganSpec
from fedpanfm.data.manifest import ManifestRow, write_manifest
from fedpanfm.data.synthetic_factors import (
    LABEL_NAMES,
    LABELS,
    NUISANCE_FACTORS,
    ORGAN_FACTORS,
    ORGAN_SESSION,
    QUALITY,
    SESSIONS,
    SHARED_FACTORS,
    UNKNOWN_LABEL_RATE,
    check_renderable,
    child_rng,
    presence_probabilities,
    sample_factors,
    sample_independent_presence,
    sample_labels,
    sample_presence,
    sample_scanner,
    site_protocols,
    visible_factors,
)
from fedpanfm.data.synthetic_render import render_organ

METADATA_NAME = "cohort_metadata.json"
FACTORS_NAME = "factors.csv"
#: The latent factors written to each site's factors.csv (``age_years`` is ``age`` in years: left out).
FACTOR_COLUMNS: tuple[str, ...] = (
    *SHARED_FACTORS, *(f for o in ORGAN_FACTORS.values() for f in o if f not in SHARED_FACTORS),
)
NATIVE_OVERSAMPLE = 1.25  # native voxels per target voxel along each axis
# Physical field of view (mm, along the organ's longest grid axis) when the organ has no target
# spacing: typical MR fields of view, so the header spacings are plausible millimetres.
FIELD_OF_VIEW_MM: dict[str, float] = {
    "brain": 200.0, "heart": 160.0, "adipose": 480.0, "liver": 240.0,
    "kidney": 140.0, "spleen": 160.0, "pancreas": 180.0,
}


def native_geometry(organ: str, spec: OrganSpec) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """(native shape, native spacing mm, reference spacing mm) of one organ's files.

    The reference spacing is the one at which the native field of view resamples exactly onto
    ``spec.grid``: ``spec.spacing`` when the config sets one, else ``FIELD_OF_VIEW_MM / max(grid)``.
    With no target spacing the loader keeps the native voxels and centre-crops 1/1.25 = 80 % of
    each axis, where the renderers keep the anatomy.
    """
    grid = spec.grid
    ref = tuple(spec.spacing) if spec.spacing else (FIELD_OF_VIEW_MM[organ] / max(grid),) * len(grid)
    shape = tuple(max(g + 2, int(round(NATIVE_OVERSAMPLE * g))) for g in grid)
    spacing = tuple(g * r / n for g, r, n in zip(grid, ref, shape))
    return shape, spacing, ref


def _write_nifti(path: Path, image: np.ndarray, spacing: tuple[float, ...]) -> None:
    diag = list(spacing) + [1.0] * (3 - len(spacing))
    affine = np.diag(diag + [1.0])
    # Origin at the field-of-view centre, as a scanner would put the isocentre.
    affine[: len(spacing), 3] = [-0.5 * n * s for n, s in zip(image.shape, spacing)]
    img = nib.Nifti1Image(image, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _write_factors(path: Path, subjects: list[dict[str, Any]]) -> None:
    """``factors.csv``: ``subject_id`` and one column per latent factor, so anyone can fit the oracle."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject_id", *FACTOR_COLUMNS])
        for m in subjects:
            writer.writerow([m["subject_id"], *(repr(float(m["factors"][c])) for c in FACTOR_COLUMNS)])


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def generate_cohort(out_dir: Path, cfg: ExperimentConfig) -> list[Path]:
    """Write the synthetic cohort and return the site folders, in site order.

    Args:
        out_dir: the cohort folder; created if missing, must not hold files already (so a
            cohort never mixes two generations).
        cfg: uses ``cfg.synth`` (sites K, subjects per site, seed, site_organs: [] = the built-in
            mix of neuro/cardiac, abdominal, full-body and partial sites) and ``cfg.data.organs``
            (each organ's target grid and spacing decide its native files).

    Raises:
        FileExistsError: ``out_dir`` is not empty.
        ValueError: ``synth.site_organs`` is inconsistent or names an organ with no renderer.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"synthetic cohort folder {out_dir} is not empty; remove it or pick another --out")
    syn = cfg.synth
    protocols = site_protocols(syn.sites, [list(s) for s in syn.site_organs])
    check_renderable(syn.organ_disease_signal, "synth.organ_disease_signal")
    geometry = {o: native_geometry(o, cfg.data.organs[o]) for o in {o for _, organs in protocols for o in organs}}
    out_dir.mkdir(parents=True, exist_ok=True)
    site_dirs: list[Path] = []
    sites_meta, subjects_meta = [], []
    for k, (mix_name, protocol) in enumerate(protocols):
        site_dir = out_dir / f"site_{k:02d}_{mix_name}"
        (site_dir / "images").mkdir(parents=True)
        scanner = sample_scanner(child_rng(syn.seed, "site", k))
        rows: list[ManifestRow] = []
        for j in range(syn.subjects):
            sid = f"s{k:02d}_{j:04d}"
            f = sample_factors(child_rng(syn.seed, "factors", k, j), 1, scanner.age_shift)
            y = sample_labels(child_rng(syn.seed, "labels", k, j), f)
            if syn.presence == "independent":
                present, restored = sample_independent_presence(
                    child_rng(syn.seed, "presence", k, j), 1, protocol, syn.presence_rate)
            else:
                present, restored = sample_presence(child_rng(syn.seed, "presence", k, j), f, protocol)
            fs = {name: float(v[0]) for name, v in f.items()}
            labels = {name: _finite(v[0]) for name, v in y.items()}
            imaged = [o for o in protocol if present[o][0]]
            for o in imaged:
                shape, spacing, _ = geometry[o]
                seen = visible_factors(fs, syn.organ_disease_signal.get(o, syn.disease_signal))
                img = render_organ(o, shape, seen, scanner, child_rng(syn.seed, "render", k, j, o))
                rel = f"images/{sid}_{o}.nii.gz"
                _write_nifti(site_dir / rel, img, spacing)
                rows.append(ManifestRow(subject_id=sid, organ=o, path=rel, labels=labels))
            p_img = presence_probabilities(f, protocol)
            subjects_meta.append({
                "subject_id": sid,
                "site": site_dir.name,
                "factors": fs,
                "labels": labels,
                "imaged": imaged,
                "dropped_by_protocol": [o for o in ORGAN_FACTORS if o not in protocol],
                "dropped_by_mnar": [o for o in protocol if not present[o][0]],
                "restored_by_floor": bool(restored[0]),
                "presence_probability": {o: float(p[0]) for o, p in p_img.items()},
            })
        write_manifest(site_dir, rows, list(LABEL_NAMES))
        _write_factors(site_dir / FACTORS_NAME, [m for m in subjects_meta if m["site"] == site_dir.name])
        site_dirs.append(site_dir)
        sites_meta.append(
            {"name": site_dir.name, "mix": mix_name, "organs": list(protocol), "scanner": asdict(scanner)}
        )
    meta = {
        "generator": "fedpanfm synthetic cohort v2 (our design; docs/synthetic-cohort.md)",
        "seed": syn.seed,
        "subjects_per_site": syn.subjects,
        "presence": syn.presence,
        "factors": {
            "shared": list(SHARED_FACTORS),
            "organ_specific": {o: list(v) for o, v in ORGAN_FACTORS.items()},
            "nuisance": list(NUISANCE_FACTORS),
        },
        "labels": {
            n: {"intercept": m.intercept, "weights": m.weights, "target_prevalence": m.target_prevalence}
            for n, m in LABELS.items()
        },
        "unknown_label_rate": UNKNOWN_LABEL_RATE,
        "missingness": {
            "sessions": {s: asdict(a) for s, a in SESSIONS.items()},
            "organ_session": ORGAN_SESSION,
            "quality": {o: asdict(a) for o, a in QUALITY.items()},
        },
        "organs": {
            o: {"native_shape": list(g[0]), "native_spacing_mm": list(g[1]), "reference_spacing_mm": list(g[2])}
            for o, g in sorted(geometry.items())
        },
        "sites": sites_meta,
        "subjects": subjects_meta,
    }
    (out_dir / METADATA_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return site_dirs
