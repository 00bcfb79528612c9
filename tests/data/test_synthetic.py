"""The synthetic cohort generator: files, manifests, determinism, and the generative structure."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from fedpanfm.data.manifest import read_manifest
from fedpanfm.data.synthetic import FACTOR_COLUMNS, METADATA_NAME, generate_cohort
from fedpanfm.data.synthetic_factors import (
    LABELS,
    NUISANCE_FACTORS,
    ORGAN_FACTORS,
    SITE_MIX,
    UNKNOWN_LABEL_RATE,
    child_rng,
    label_probabilities,
    sample_factors,
    sample_independent_presence,
    sample_labels,
    sample_presence,
    sample_scanner,
    sigmoid,
)
from fedpanfm.data.synthetic_render import (
    RENDERERS,
    SMALL_ORGANS,
    irregular_organ,
    irregularity,
    lesion_count,
    lesions,
    native_coords,
    rank_gaussian,
    render_organ,
    smooth_noise,
    texture_length,
)

ALL_ORGANS = tuple(ORGAN_FACTORS)


def _cohort(tmp_path: Path, name: str, overrides: list[str]) -> tuple[list[Path], dict]:
    cfg = tiny_config(overrides)
    sites = generate_cohort(tmp_path / name, cfg)
    return sites, json.loads((tmp_path / name / METADATA_NAME).read_text())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    return _cohort(tmp_path_factory.mktemp("synth"), "c", ["synth.sites=3", "synth.subjects=8", "synth.seed=7"])


def test_site_folders_follow_the_builtin_mix(cohort: tuple[list[Path], dict]) -> None:
    sites, meta = cohort
    assert [s.name for s in sites] == ["site_00_neuro_cardiac", "site_01_abdominal", "site_02_full_body"]
    for site, (_, mix) in zip(sites, SITE_MIX):
        manifest = read_manifest(site, tiny_config().data.organ_set())
        organs = {r.organ for r in manifest.rows}
        assert organs <= set(mix), f"{site.name} lists organs outside its protocol: {organs - set(mix)}"
        # Every subject is in the manifest with at least one organ.
        assert manifest.subject_ids() == [f"s{sites.index(site):02d}_{j:04d}" for j in range(8)]
    assert len(meta["subjects"]) == 24


def test_files_open_with_the_written_native_spacing(cohort: tuple[list[Path], dict]) -> None:
    sites, meta = cohort
    cfg = tiny_config()
    for site in sites:
        for row in read_manifest(site, cfg.data.organ_set()).rows:
            img = nib.load(site / row.path)
            geo = meta["organs"][row.organ]
            grid = cfg.data.organs[row.organ].grid
            assert img.shape == tuple(geo["native_shape"])
            assert len(img.shape) == len(grid) and img.shape != tuple(grid)
            np.testing.assert_allclose(img.header.get_zooms(), geo["native_spacing_mm"], rtol=1e-6)
            # The native field of view equals grid x reference spacing: resampling maps it onto the grid.
            np.testing.assert_allclose(
                np.array(img.shape) * img.header.get_zooms(), np.array(grid) * geo["reference_spacing_mm"], rtol=1e-5
            )
            data = np.asarray(img.dataobj)
            assert data.dtype == np.float32 and np.isfinite(data).all()


def test_metadata_matches_manifests(cohort: tuple[list[Path], dict]) -> None:
    sites, meta = cohort
    organs = tiny_config().data.organ_set()
    rows = {(r.subject_id, r.organ): r for s in sites for r in read_manifest(s, organs).rows}
    for subj in meta["subjects"]:
        imaged = [o for (sid, o) in rows if sid == subj["subject_id"]]
        assert sorted(imaged) == sorted(subj["imaged"]) and imaged
        site_organs = next(s["organs"] for s in meta["sites"] if s["name"] == subj["site"])
        assert set(subj["dropped_by_protocol"]) == set(ALL_ORGANS) - set(site_organs)
        assert set(subj["imaged"]) | set(subj["dropped_by_mnar"]) == set(site_organs)
        labels = rows[(subj["subject_id"], imaged[0])].labels
        assert labels == {k: v for k, v in subj["labels"].items()}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    over = ["synth.sites=2", "synth.subjects=3"]
    a, _ = _cohort(tmp_path, "a", over + ["synth.seed=1"])
    b, _ = _cohort(tmp_path, "b", over + ["synth.seed=1"])
    c, _ = _cohort(tmp_path, "c", over + ["synth.seed=2"])
    for sa, sb in zip(a, b):
        files = sorted(p.relative_to(sa) for p in sa.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(sb) for p in sb.rglob("*") if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(sa, sb, [str(f) for f in files], shallow=False)
        assert not mismatch and not errors
    assert filecmp.cmp(tmp_path / "a" / METADATA_NAME, tmp_path / "b" / METADATA_NAME, shallow=False)
    meta_a = json.loads((tmp_path / "a" / METADATA_NAME).read_text())
    meta_c = json.loads((tmp_path / "c" / METADATA_NAME).read_text())
    assert meta_a["subjects"][0]["factors"] != meta_c["subjects"][0]["factors"]
    common = sorted({p.name for p in (a[0] / "images").iterdir()} & {p.name for p in (c[0] / "images").iterdir()})
    assert common
    for name in common:
        img_a, img_c = (nib.load(s[0] / "images" / name).get_fdata() for s in (a, c))
        assert not np.allclose(img_a, img_c)

def test_custom_site_organs_and_bad_requests(tmp_path: Path) -> None:
    sites, meta = _cohort(
        tmp_path, "ok", ["synth.sites=2", "synth.subjects=4", "synth.site_organs=[[pancreas],[kidney,heart]]"]
    )
    assert [s.name for s in sites] == ["site_00_custom", "site_01_custom"]
    organs = tiny_config().data.organ_set()
    assert {r.organ for r in read_manifest(sites[0], organs).rows} == {"pancreas"}  # floor keeps the only organ
    assert {r.organ for r in read_manifest(sites[1], organs).rows} <= {"kidney", "heart"}
    with pytest.raises(ValueError, match="lists 1 sites but synth.sites = 2"):
        generate_cohort(tmp_path / "bad1", tiny_config(["synth.sites=2", "synth.site_organs=[[heart]]"]))
    with pytest.raises(ValueError, match=r"site_organs\[0\].*cannot render lung"):
        generate_cohort(
            tmp_path / "bad2",
            tiny_config(["data.extra_organs=[lung]", "data.organs.lung={grid: [8, 8], patch: [4, 4]}",
                         "synth.sites=1", "synth.site_organs=[[lung]]"]),
        )
    with pytest.raises(FileExistsError, match="not empty"):
        generate_cohort(tmp_path / "ok", tiny_config(["synth.sites=1"]))


def test_label_prevalence_and_formula() -> None:
    f = sample_factors(np.random.default_rng(123), 40_000)
    probs = label_probabilities(f)
    assert len(probs) >= 8
    for name, p in probs.items():
        target = LABELS[name].target_prevalence
        assert 0.03 <= p.mean() <= 0.30, name
        assert abs(p.mean() - target) < 0.25 * target, (name, p.mean(), target)
    # One subject by hand: the logistic of intercept + weighted factors.
    m = LABELS["ckd"]
    z = m.intercept + sum(w * f[k][5] for k, w in m.weights.items())
    assert probs["ckd"][5] == pytest.approx(1.0 / (1.0 + np.exp(-z)))
    y = sample_labels(np.random.default_rng(1), f)
    unknown = np.mean([np.isnan(v).mean() for v in y.values()])
    assert abs(unknown - UNKNOWN_LABEL_RATE) < 0.01
    known = ~np.isnan(y["nafld"])
    assert abs(y["nafld"][known].mean() - probs["nafld"][known].mean()) < 0.02


def test_labels_spread_over_organs_and_ignore_nuisance() -> None:
    factor_organ = {fac: o for o, facs in ORGAN_FACTORS.items() for fac in facs}
    reached: set[str] = set()
    for name, m in LABELS.items():
        assert not set(m.weights) & set(NUISANCE_FACTORS), name
        organs = {factor_organ[k] for k in m.weights if k in factor_organ}
        shared = [k for k in m.weights if k not in factor_organ]
        # Several organs: another organ's factor, or a shared factor visible in several organs.
        assert len(organs) >= 2 or (organs and shared), name
        reached |= organs
    assert {"pancreas", "kidney", "spleen"} <= reached


def test_missingness_depends_on_factors() -> None:
    f = sample_factors(np.random.default_rng(5), 20_000)
    present, restored = sample_presence(np.random.default_rng(6), f, ALL_ORGANS)
    stacked = np.stack([present[o] for o in ALL_ORGANS])
    assert stacked.any(axis=0).all()

    def gap(organ: str, factor: str) -> float:
        hi, lo = f[factor] > np.quantile(f[factor], 0.75), f[factor] < np.quantile(f[factor], 0.25)
        return float(present[organ][lo].mean() - present[organ][hi].mean())

    assert gap("brain", "neuro") > 0.15  # sicker brains are scanned less
    assert gap("liver", "metabolic") > 0.1 and gap("kidney", "renal") > 0.1
    assert gap("pancreas", "body_size") > 0.05  # large bodies spoil the small pancreas
    assert abs(gap("heart", "body_size")) < 0.03  # heart presence does not read body size
    # A one-organ site keeps its organ for everyone; the floor is what kept the failed ones.
    only, floor = sample_presence(np.random.default_rng(7), f, ("brain",))
    assert only["brain"].all() and 0.05 < floor.mean() < 0.4


@pytest.mark.parametrize("organ", sorted(RENDERERS))
@pytest.mark.parametrize("shape", [(12, 14), (6, 10, 12)])
@pytest.mark.parametrize("level", [-2.5, 2.5])
def test_renderers_draw_2d_and_3d(organ: str, shape: tuple[int, ...], level: float) -> None:
    f = {k: level for k in sample_factors(np.random.default_rng(0), 1)}
    f["cardiac_phase"] = 0.5 + level / 5.0
    img = render_organ(organ, shape, f, sample_scanner(np.random.default_rng(0)), np.random.default_rng(1))
    assert img.shape == shape and img.dtype == np.float32 and np.isfinite(img).all()
    assert img.std() > 10.0


@pytest.mark.parametrize("organ", sorted(SMALL_ORGANS))
@pytest.mark.parametrize("level", [-2.5, 2.5])
def test_small_organs_stay_inside_the_crop_in_any_pose(organ: str, level: float) -> None:
    # Without the scanner, everything outside the central 85 % of the image plane is plain
    # background at extreme factors and any drawn pose, so the loader's centre crop keeps the
    # organ. (Heart and adipose images show the chest / body outline, which, as in real scans,
    # may reach the field of view's edge.)
    f = {k: level for k in sample_factors(np.random.default_rng(0), 1)}
    for shape in ((30, 30), (6, 20, 24)):
        cs = native_coords(shape)
        for seed in range(8):
            clean = np.broadcast_to(RENDERERS[organ](cs, f, np.random.default_rng(seed)), shape)
            outer = np.broadcast_to((np.abs(cs[-2]) > 0.85) | (np.abs(cs[-1]) > 0.85), shape)
            assert np.ptp(clean[outer]) < 1e-6, (organ, shape, seed)


def test_rank_gaussian_matches_the_normal_marginal_whatever_the_length() -> None:
    rng = np.random.default_rng(0)
    fine, coarse = (rank_gaussian(smooth_noise(rng, (40, 40), s)) for s in (0.02, 0.2))
    # Same values, different places: identical histograms ...
    assert np.allclose(np.sort(fine.ravel()), np.sort(coarse.ravel()))
    assert abs(fine.mean()) < 1e-3 and abs(fine.std() - 1.0) < 0.01
    # ... and different spatial structure (lag-1 autocorrelation).
    lag = [np.corrcoef(x[:, 1:].ravel(), x[:, :-1].ravel())[0, 1] for x in (fine, coarse)]
    assert lag[0] < 0.8 < 0.95 < lag[1]


def test_outline_roughness_keeps_the_organ_volume() -> None:
    cs = native_coords((48, 48))
    plain = irregular_organ(cs, (0, 0, 0), (0.5, 0.5, 0.4), 0.0, np.random.default_rng(0))
    for seed in range(5):
        rough = irregular_organ(cs, (0, 0, 0), (0.5, 0.5, 0.4), 0.33, np.random.default_rng(seed))
        assert abs(int((rough > 0.5).sum()) - int((plain > 0.5).sum())) <= 0.03 * (plain > 0.5).sum()
        assert np.abs(rough - plain).sum() > 0.03 * plain.sum()  # and the outline did change


def test_lesion_burden_is_fixed_and_count_grows_with_the_channel() -> None:
    cs = native_coords((64, 64))
    volumes = [lesions(cs, (0, 0, 0), (0.5, 0.5, 0.5), n, 0.1, np.random.default_rng(n)).sum() for n in (1, 4)]
    assert abs(volumes[0] - volumes[1]) < 0.35 * volumes[0]
    assert lesion_count(-2.0) == 1 < lesion_count(0.0) < lesion_count(2.0)
    assert texture_length(-2.0) < texture_length(0.0) < texture_length(2.0)
    assert irregularity(-2.0) < irregularity(0.0) < irregularity(2.0)


def test_disease_changes_structure_not_the_intensity_histogram() -> None:
    # Without scanner and pose noise averaged over images, the intensity quantiles of an organ
    # image do not move with its disease channels, while a structural statistic does.
    organ, shape, n = "liver", (24, 24), 40
    quantiles, lag1 = {}, {}
    for level in (-2.0, 2.0):
        f = {k: 0.0 for k in sample_factors(np.random.default_rng(0), 1)}
        f["steatosis"] = level  # liver texture (and a little of its outline)
        imgs = [np.broadcast_to(RENDERERS[organ](native_coords(shape), f, np.random.default_rng(i)), shape)
                for i in range(n)]
        quantiles[level] = np.mean([np.quantile(im, [0.8, 0.85, 0.9, 0.95, 0.99]) for im in imgs], axis=0)
        lag1[level] = [np.corrcoef(im[:, 1:].ravel(), im[:, :-1].ravel())[0, 1] for im in imgs]
    spread = np.abs(quantiles[2.0] - quantiles[-2.0]).max()
    design = SMALL_ORGANS[organ]
    assert spread < 0.1 * (design.tissue - design.background), quantiles
    diff = np.mean(lag1[2.0]) - np.mean(lag1[-2.0])
    assert diff > 3 * np.std(lag1[-2.0]) / np.sqrt(n), lag1


def test_independent_presence_ignores_the_factors() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    f = sample_factors(rng, n)
    present, restored = sample_independent_presence(rng, n, ALL_ORGANS, 0.8)
    for organ in ALL_ORGANS:
        assert abs(present[organ].mean() - 0.8) < 0.02
        for factor in ("neuro", "metabolic", "renal", "pancreatic"):
            assert abs(np.corrcoef(present[organ], f[factor])[0, 1]) < 0.03
    assert np.stack([present[o] for o in ALL_ORGANS]).any(axis=0).all()
    assert restored.mean() < 1e-3


def test_factors_csv_holds_every_subject_and_factor(cohort: tuple[list[Path], dict]) -> None:
    sites, meta = cohort
    by_id = {s["subject_id"]: s["factors"] for s in meta["subjects"]}
    for site in sites:
        lines = (site / "factors.csv").read_text().splitlines()
        assert lines[0].split(",") == ["subject_id", *FACTOR_COLUMNS]
        for line in lines[1:]:
            sid, *values = line.split(",")
            assert [float(v) for v in values] == [by_id[sid][c] for c in FACTOR_COLUMNS]  # repr round-trips
        manifest_ids = {line.split(",")[0] for line in (site / "manifest.csv").read_text().splitlines()[1:] if line}
        assert {line.split(",")[0] for line in lines[1:]} == manifest_ids


def test_evaluation_cohort_presence_is_independent(tmp_path: Path) -> None:
    sites, meta = _cohort(tmp_path, "e", ["synth.sites=1", "synth.subjects=12", "synth.presence=independent",
                                          "synth.presence_rate=0.5"])
    assert meta["presence"] == "independent" and len(sites) == 1
    imaged = [len(s["imaged"]) for s in meta["subjects"]]
    assert min(imaged) >= 1  # the floor keeps one organ
    # Site 0 is neuro_cardiac (2 organs): at rate 0.5 about half of them are imaged.
    assert 0.3 < np.mean(imaged) / 2 < 0.9

def test_dominant_organs_are_high_contrast_and_driven_by_nuisance() -> None:
    scanner = sample_scanner(np.random.default_rng(0))
    n = 24
    f = sample_factors(np.random.default_rng(3), n)
    small_shape = (6, 10, 10)
    shapes = {"heart": (20, 20), "adipose": (20, 20), "kidney": small_shape, "spleen": small_shape, "pancreas": small_shape}
    contrast: dict[str, float] = {}
    means: dict[str, np.ndarray] = {}
    for organ, shape in shapes.items():
        imgs = [
            render_organ(organ, shape, {k: float(v[i]) for k, v in f.items()}, scanner, child_rng(0, i, organ))
            for i in range(n)
        ]
        contrast[organ] = float(np.mean([im.std() for im in imgs]))
        means[organ] = np.array([im.mean() for im in imgs])
    small = max(contrast["kidney"], contrast["spleen"], contrast["pancreas"])
    assert min(contrast["heart"], contrast["adipose"]) > 2.0 * small, contrast
    # Across subjects the adipose image mostly follows body size, a factor no label reads.
    assert np.corrcoef(means["adipose"], f["body_size"])[0, 1] > 0.8
    assert abs(np.corrcoef(means["adipose"], sigmoid(f["metabolic"]))[0, 1]) < np.corrcoef(
        means["adipose"], f["body_size"]
    )[0, 1]
