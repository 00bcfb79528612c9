"""What an embedding encodes: ridge R^2 of latent factors, participation ratio, synthetic metadata."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedpanfm.data.synthetic import METADATA_NAME, generate_cohort
from fedpanfm.data.synthetic_factors import NUISANCE_FACTORS, child_rng, sample_factors, sample_scanner, visible_factors
from fedpanfm.data.synthetic_render import render_organ
from fedpanfm.evaluation.embed import Embeddings
from fedpanfm.evaluation.factors import factor_decodability, load_cohort_factors, participation_ratio, ridge_r2
from fedpanfm.evaluation.probe import ProbeSplit


def test_ridge_r2_finds_a_linear_factor_and_not_an_independent_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    linear = 2.0 * x[:, 1] - 0.5 * x[:, 4] + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64)
    independent = torch.randn(4000, generator=g, dtype=torch.float64)
    y = torch.stack([linear, independent], dim=1)
    r2 = ridge_r2(x[:3000], y[:3000], x[3000:], y[3000:])
    # noise variance 0.01 of a total 4.26: R^2 = 1 - 0.01 / 4.26
    assert r2[0].item() == pytest.approx(1 - 0.01 / 4.26, abs=3e-3)
    assert abs(r2[1].item()) < 0.02


def test_participation_ratio_counts_directions() -> None:
    g = torch.Generator().manual_seed(1)
    iso = torch.randn(20000, 3, generator=g)
    assert participation_ratio(iso) == pytest.approx(3.0, abs=0.05)
    line = torch.randn(500, 1, generator=g) * torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    assert participation_ratio(line) == pytest.approx(1.0, abs=1e-6)
    # eigenvalues 4 and 1: (4 + 1)^2 / (16 + 1)
    two = torch.randn(40000, 2, generator=g) * torch.tensor([[2.0, 1.0]])
    assert participation_ratio(two) == pytest.approx(25 / 17, abs=0.03)
    assert math.isnan(participation_ratio(torch.ones(1, 3)))


def _embeddings(ids: list[str], cls: torch.Tensor) -> Embeddings:
    n = len(ids)
    return Embeddings(subject_ids=ids, cls=cls, shares=torch.zeros(n, 1), present=torch.ones(n, 1, dtype=torch.bool),
                      labels=torch.zeros(n, 0), label_names=(), organ_names=("brain",))


def test_factor_decodability_separates_nuisance_from_signal() -> None:
    rng = np.random.default_rng(2)
    ids = [f"s{i:04d}" for i in range(600)]
    factors = {s: {"body_size": float(rng.standard_normal()), "renal": float(rng.standard_normal()),
                   "age": float(rng.standard_normal())} for s in ids}
    # An embedding that carries body size only (the collapse docs/results.md reports).
    cls = torch.tensor([[factors[s]["body_size"], 0.3 * factors[s]["body_size"]] for s in ids]) + 0.05 * torch.randn(600, 2)
    split = ProbeSplit(train=ids[:300], val=ids[300:400], test=ids[400:])
    rep = factor_decodability(_embeddings(ids, cls), split, factors, signal=("renal", "age"), nuisance=("body_size",))
    assert rep.r2["body_size"] > 0.95
    assert abs(rep.r2["renal"]) < 0.05 and abs(rep.r2["age"]) < 0.05
    assert rep.signal_r2 == pytest.approx((rep.r2["renal"] + rep.r2["age"]) / 2)
    assert rep.nuisance == ("body_size",) and rep.signal_factors == ("renal", "age")
    assert (rep.n_fit, rep.n_test) == (400, 200)
    with pytest.raises(KeyError, match="s9999"):
        factor_decodability(_embeddings(ids + ["s9999"], torch.cat([cls, cls[:1]])), split, factors, ("renal",), ())


def test_load_cohort_factors(tmp_path: Path) -> None:
    cfg = tiny_config(["synth.sites=2", "synth.subjects=3"])
    generate_cohort(tmp_path / "c", cfg)
    factors, signal, nuisance = load_cohort_factors(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / METADATA_NAME).read_text())
    assert set(factors) == {s["subject_id"] for s in meta["subjects"]} and len(factors) == 6
    assert nuisance == NUISANCE_FACTORS and "renal" in signal and "body_size" not in signal
    assert load_cohort_factors(tmp_path) is None  # no metadata file: not a synthetic cohort
    (tmp_path / "c" / METADATA_NAME).write_text(json.dumps({"subjects": [{"id": 1}]}))
    with pytest.raises(ValueError, match=METADATA_NAME):
        load_cohort_factors(tmp_path / "c")


def test_disease_signal_scales_only_disease_factors_in_the_images() -> None:
    f = {k: float(v[0]) for k, v in sample_factors(np.random.default_rng(4), 1).items()}
    seen = visible_factors(f, 3.0)
    for k in NUISANCE_FACTORS:
        assert seen[k] == f[k]
    assert seen["renal"] == 3.0 * f["renal"] and seen["age"] == 3.0 * f["age"]
    # At signal 0 two subjects differing only in their disease factors render the same image.
    other = dict(f, renal=f["renal"] + 2.0, metabolic=f["metabolic"] - 1.5, age=f["age"] + 1.0)
    scanner = sample_scanner(np.random.default_rng(0))
    for organ, shape in (("kidney", (4, 8, 8)), ("liver", (8, 8, 8)), ("heart", (16, 16))):
        a = render_organ(organ, shape, visible_factors(f, 0.0), scanner, child_rng(0, organ))
        b = render_organ(organ, shape, visible_factors(other, 0.0), scanner, child_rng(0, organ))
        c = render_organ(organ, shape, visible_factors(other, 1.0), scanner, child_rng(0, organ))
        assert np.array_equal(a, b), organ
        if organ != "heart":  # the heart shows vascular / cardiac, not renal or metabolic
            assert not np.array_equal(a, c), organ


def test_organ_disease_signal_overrides_one_organ_only(tmp_path: Path) -> None:
    base = ["synth.sites=1", "synth.subjects=3", "synth.site_organs=[[heart, kidney]]", "synth.disease_signal=2"]
    a = generate_cohort(tmp_path / "a", tiny_config(base))[0]
    b = generate_cohort(tmp_path / "b", tiny_config(base + ["synth.organ_disease_signal={heart: 0.5}"]))[0]
    hearts = sorted((a / "images").glob("*_heart.nii.gz"))
    kidneys = sorted((a / "images").glob("*_kidney.nii.gz"))
    assert hearts and kidneys
    for f in kidneys:  # the organ not named keeps synth.disease_signal: byte-identical files
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()
    assert any(f.read_bytes() != (b / "images" / f.name).read_bytes() for f in hearts)
    with pytest.raises(ValueError, match="organ_disease_signal: the synthetic cohort cannot render lung"):
        generate_cohort(tmp_path / "c", tiny_config(base + ["synth.organ_disease_signal={lung: 1.0}"]))


def _write_factors(cohort: Path) -> dict[str, dict[str, float]]:
    """factors.csv in every site folder, from cohort_metadata.json (what generator v2 writes)."""
    meta = json.loads((cohort / METADATA_NAME).read_text())
    by_id = {s["subject_id"]: s["factors"] for s in meta["subjects"]}
    names = sorted(next(iter(by_id.values())))
    for site in sorted(d for d in cohort.iterdir() if (d / "manifest.csv").is_file()):
        ids = [line.split(",")[0] for line in (site / "manifest.csv").read_text().splitlines()[1:] if line]
        rows = ["subject_id," + ",".join(names)] + [f"{s}," + ",".join(repr(by_id[s][n] + 1.0) for n in names)
                                                    for s in dict.fromkeys(ids)]
        (site / "factors.csv").write_text("\n".join(rows) + "\n")
    return {s: {n: v[n] + 1.0 for n in names} for s, v in by_id.items()}


def test_factors_csv_is_read_before_the_metadata_and_checked(tmp_path: Path) -> None:
    cfg = tiny_config(["synth.sites=2", "synth.subjects=3"])
    generate_cohort(tmp_path / "c", cfg)
    expected = _write_factors(tmp_path / "c")  # shifted by +1: tells the two sources apart
    factors, signal, nuisance = load_cohort_factors(tmp_path / "c")
    assert set(factors) == set(expected) and all(factors[s] == pytest.approx(expected[s]) for s in expected)
    assert nuisance == NUISANCE_FACTORS and "renal" in signal
    # Without the metadata file the label / nuisance factors come from the generator.
    (tmp_path / "c" / METADATA_NAME).unlink()
    again, signal2, nuisance2 = load_cohort_factors(tmp_path / "c")
    assert set(again) == set(expected) and set(signal2) == set(signal) and nuisance2 == nuisance
    site = sorted((tmp_path / "c").glob("site_*"))[0]
    good = (site / "factors.csv").read_text().splitlines()
    bad_cases = {
        "row 2, column age": [good[0], good[1].replace(good[1].split(",")[1], "abc", 1), *good[2:]],
        "row 1": ["id,age", *good[1:]],
        "appears twice": [*good, good[1]],
        "row 3: ": [good[0], good[1], good[2] + ",1.0"],
    }
    header = good[0].split(",")
    for match, lines in bad_cases.items():
        if match.startswith("row 2, column"):
            match = f"row 2, column {header[1]}"
        (site / "factors.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match) as info:
            load_cohort_factors(tmp_path / "c")
        assert str(site / "factors.csv") in str(info.value)
    (site / "factors.csv").unlink()  # only the other site carries factors
    with pytest.raises(ValueError, match="missing, while other sites"):
        load_cohort_factors(tmp_path / "c")
