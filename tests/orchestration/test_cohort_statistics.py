"""Federated cohort statistics: aggregates only, small cells withheld, bad replies refused, one
table per run (fedpanfm/data/site_statistics.py, sites/ and orchestration/cohort_statistics.py)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from conftest import make_site, tiny_config

from fedpanfm.data.preview import PreviewRow
from fedpanfm.data.site_statistics import (
    MIN_CELL,
    StatisticsError,
    check_statistics,
    measure_statistics,
    site_statistics,
    smoothed_quantiles,
    statistics_from_text,
    statistics_to_text,
)
from fedpanfm.tb import RunLogger, read_tags
from orchestration.cohort_statistics import CSV_NAME, IMAGE_TAG, JSON_NAME, TEXT_TAG, CohortStatistics, write_statistics
from sites.cohort_statistics import release_threshold

ORGANS = ("brain", "heart", "adipose", "liver", "kidney", "spleen", "pancreas")


def _released_numbers(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, value) of every number in a released statistics object."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _released_numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _released_numbers(v, f"{path}[{i}]")]
    return [(path, obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def _rows(counts: dict[str, int], subjects: int, seed: int = 0) -> list[PreviewRow]:
    """Measured images: subject k holds organ o when k < counts[o]; random intensities."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(subjects):
        for organ, n in counts.items():
            if k < n:
                p = np.sort(rng.normal(100.0, 30.0, 3))
                rows.append(PreviewRow(f"s{k}", organ, f"{k}_{organ}.nii.gz", modality="MR", normalize="zscore",
                                       orientation="RAS", obliquity_deg=0.0, shape_before="12x12x12",
                                       spacing_before=f"{rng.uniform(1, 3):.4f}x2x2", p1_before=p[0], p50_before=p[1],
                                       p99_before=p[2], p1_after=-2.0 + rng.normal(), p50_after=rng.normal(),
                                       p99_after=2.0 + rng.normal()))
    return rows


def test_smoothed_quantiles_are_means_of_k_subjects_never_one_value() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=23)
    q = smoothed_quantiles(values, 5)
    assert q is not None and q["n"] == 23 and q["q10"] <= q["q50"] <= q["q90"]
    x = np.sort(values)
    windows = [round(float(x[i:i + 5].mean()), 4) for i in range(23 - 4)]
    for key in ("q10", "q50", "q90"):
        # Each released quantile is the mean of 5 consecutive order statistics (4 significant digits) ...
        assert any(abs(q[key] - w) <= 1e-3 * max(1.0, abs(w)) for w in windows), key
        # ... and no single subject's value.
        assert np.min(np.abs(values - q[key])) > 1e-6
    assert smoothed_quantiles(values[:4], 5) is None


def test_small_cells_are_withheld_and_nothing_rests_on_fewer_than_k() -> None:
    # 12 subjects: heart in all, liver in 3 (a small cell), kidney in 9 (its complement, 3, is small).
    stats = site_statistics(_rows({"heart": 12, "liver": 3, "kidney": 9}, 12), organs=ORGANS)
    check_statistics(json.loads(statistics_to_text(stats)), ORGANS)
    organs = stats["organs"]
    assert stats["subjects"] == 12 and organs["brain"] == {"subjects": 0, "numeric": {}, "categories": {}}
    assert organs["heart"]["subjects"] == 12 and organs["heart"]["numeric"]["p50_before"]["n"] == 12
    assert organs["liver"] == {"subjects": None, "numeric": {}, "categories": {}}
    # The kidney's count is withheld, so no count that would give it back is released either.
    assert organs["kidney"]["subjects"] is None
    assert all(q["n"] is None for q in organs["kidney"]["numeric"].values())
    assert organs["kidney"]["categories"]["modality"] == {"MR": None}
    assert {"liver/subjects", "kidney/subjects", "liver/images below min_cell"} <= set(stats["withheld"])
    # Structure: every released count is 0 or >= k; every quantile block rests on >= k images.
    for path, v in _released_numbers(stats):
        if path.endswith((".subjects", ".n")) or ".categories." in path or path == ".images_left_out":
            assert v == 0 or v >= MIN_CELL, path
    # A site smaller than k releases nothing but that.
    tiny = site_statistics(_rows({"heart": 4}, 4), organs=ORGANS)
    assert tiny["subjects"] is None and tiny["organs"] == {}


def test_changing_one_subject_below_the_threshold_changes_no_released_number(tmp_path: Path) -> None:
    cfg = tiny_config(["data.on_bad=skip"])
    # Real NIfTI files: 8 subjects with a heart, 2 of them with a liver (below k = 5).
    sets = {f"s{k}": ["heart", "liver"] if k < 2 else ["heart"] for k in range(8)}
    make_site(tmp_path / "site", cfg, sets)
    before = measure_statistics(tmp_path / "site", cfg)
    assert before["organs"]["heart"]["subjects"] == 8 and before["organs"]["liver"]["subjects"] is None
    # The liver subject's image becomes something else entirely (other intensities, shape, spacing).
    path = tmp_path / "site" / "img" / "s0_liver.nii.gz"
    rng = np.random.default_rng(7)
    nib.save(nib.Nifti1Image(rng.normal(900.0, 300.0, (20, 14, 11)).astype(np.float32), np.diag([3.0, 1.0, 4.0, 1.0])),
             str(path))
    after = measure_statistics(tmp_path / "site", cfg)
    assert after == before
    # A heart image (an organ over >= k subjects) does move the released values: the check has teeth.
    heart = tmp_path / "site" / "img" / "s0_heart.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(900.0, 300.0, (24, 24, 1)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(heart))
    assert measure_statistics(tmp_path / "site", cfg) != before


def _good() -> dict[str, Any]:
    return site_statistics(_rows({"heart": 12, "liver": 6}, 12), organs=ORGANS)


def _breaks(mutate) -> dict[str, Any]:  # noqa: ANN001 - a function editing the statistics in place
    obj = copy.deepcopy(_good())
    mutate(obj)
    return obj


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(extra=1), "keys"),
    (lambda o: o.update(version=2), "version"),
    (lambda o: o.update(min_cell=2), "min_cell"),
    (lambda o: o["organs"]["liver"].update(subjects=2), "small cell"),
    (lambda o: o["organs"]["heart"]["numeric"]["p50_before"].update(n=3), "fewer than min_cell"),
    (lambda o: o["organs"]["heart"]["numeric"]["p50_before"].update(q50=1e9), "finite number"),
    (lambda o: o["organs"]["heart"]["numeric"]["p50_before"].update(q10=500.0), "not in order"),
    (lambda o: o["organs"]["heart"]["numeric"].update(subject_s0_p50={"n": 12, "q10": 1, "q50": 1, "q90": 1}),
     "not a released value"),
    (lambda o: o["organs"].update(lung=o["organs"]["heart"]), "not an organ"),
    (lambda o: o["organs"]["heart"]["categories"]["modality"].update({"MR": 12, "CT": 1}), "small cell"),
    (lambda o: o["organs"]["heart"]["categories"]["modality"].update({"<script>": 12}), "expected form"),
    (lambda o: o.update(subjects=True), "count"),
    (lambda o: o.update(withheld=["x" * 500]), "withheld"),
])
def test_malformed_replies_are_refused(mutate, message: str) -> None:  # noqa: ANN001
    check_statistics(_good(), ORGANS)  # the unmodified reply passes
    with pytest.raises(StatisticsError, match=message):
        check_statistics(_breaks(mutate), ORGANS)


def test_reply_text_is_bounded_and_strict_json() -> None:
    good = statistics_to_text(_good())
    assert statistics_from_text(good, ORGANS)["subjects"] == 12
    with pytest.raises(StatisticsError, match="not a number"):
        statistics_from_text(good.replace('"q50":', '"q50":NaN,"x":', 1), ORGANS)
    with pytest.raises(StatisticsError, match="not JSON"):
        statistics_from_text(good[:-3], ORGANS)
    with pytest.raises(StatisticsError, match="at most"):
        statistics_from_text(" " * (600 * 1024) + good, ORGANS)
    with pytest.raises(StatisticsError, match="min_cell"):  # the server asked for more than the site used
        statistics_from_text(good, ORGANS, min_cell=10)


def test_the_site_decides_the_floor() -> None:
    assert release_threshold({"min-cell": 2}, {}, 5) == MIN_CELL  # a server asking for less gets the floor
    assert release_threshold({"min-cell": 8}, {}, 5) == 8
    assert release_threshold({}, {"statistics-min-cell": 11}, 5) == 11
    with pytest.raises(ValueError, match="min-cell"):
        release_threshold({"min-cell": "lots"}, {}, 5)


def test_the_table_has_one_row_per_site_and_reaches_tensorboard(tmp_path: Path) -> None:
    result = CohortStatistics(5, {"site_a": _good(), "site_b": site_statistics(_rows({"heart": 7}, 7, seed=3),
                                                                               organs=ORGANS)},
                              {"site_c": "error reply"})
    with RunLogger(tmp_path / "tensorboard", "server") as tb:
        paths = write_statistics(tmp_path, result, tb)
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["site"] for r in rows] == ["site_a", "site_b"]
    assert rows[0]["heart/subjects"] == "12" and rows[1]["heart/subjects"] == "7"
    assert rows[1]["liver/subjects"] == "0" and rows[0]["liver/subjects"] == "6"
    assert float(rows[0]["heart/p50_before/q50"]) == _good()["organs"]["heart"]["numeric"]["p50_before"]["q50"]
    stored = json.loads((tmp_path / JSON_NAME).read_text())
    assert set(stored["sites"]) == {"site_a", "site_b"} and stored["dropped"] == {"site_c": "error reply"}
    assert paths["csv"] == tmp_path / CSV_NAME
    tags = read_tags(tmp_path / "tensorboard" / "server")
    assert IMAGE_TAG in tags["images"]
    assert any(t.startswith(TEXT_TAG) for t in tags["tensors"])


def _tampering_client_app(run_config):  # noqa: ANN001, ANN202 - a ClientApp builder for simulate()
    """The real ClientApp, except that partition 0 sends a small cell in its statistics."""
    from flwr.app import ConfigRecord, Context, Message
    from flwr.clientapp import ClientApp

    from fedpanfm.data.site_statistics import ACTION, RECORD, TEXT_KEY
    from sites.client_app import build_client_app

    inner = build_client_app(run_config)
    app = ClientApp()
    app.train()(inner)
    app.evaluate()(inner)

    @app.query(ACTION)
    def statistics(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            stats = json.loads(str(reply.content[RECORD][TEXT_KEY]))
            stats["organs"]["heart"]["subjects"] = 2  # one subject's worth of information
            reply.content[RECORD] = ConfigRecord({TEXT_KEY: json.dumps(stats)})
        return reply

    return app


@pytest.mark.timeout(600)
def test_simulated_federation_writes_one_row_per_site_and_drops_a_bad_reply(tmp_path: Path) -> None:
    """One small simulation checks two things: the statistics round, and the sites' per-step
    curves on the global step (sites/step_curves.py)."""
    from orchestration.simulate import simulate

    root = Path(__file__).resolve().parents[2]
    overrides = [f"cohort={tmp_path / 'cohort'}", f"logging.run_dir={tmp_path / 'runs'}", "synth.sites=3",
                 "synth.subjects=8", "federation.rounds=2", "federation.min_sites=2", "data.val_fraction=0.25",
                 "evaluation.server_cohort=''"]
    summary = simulate(root / "configs" / "quickstart.yaml", overrides, cpus=2, client_app=_tampering_client_app)
    run = Path(summary["run_folder"])
    assert summary["rounds"] == 2  # training ran after the statistics round
    stored = json.loads((run / JSON_NAME).read_text())
    sites = sorted(summary["sites"])
    assert len(sites) == 3 and sorted(stored["sites"]) == sites[1:]
    assert list(stored["dropped"]) == [sites[0]] and "small cell" in stored["dropped"][sites[0]]
    with (run / CSV_NAME).open() as fh:
        assert [r["site"] for r in csv.DictReader(fh)] == sites[1:]
    assert "dropped the reply of " + sites[0] in (run / "run.log").read_text()
    tags = read_tags(run / "tensorboard" / "server")
    assert IMAGE_TAG in tags["images"]

    # Per-step curves: each site's steps of round 2 continue where round 1's ended, once each.
    from fedpanfm.tb import read_scalars, site_run_name

    for site in sites:
        steps = [s for s, _ in read_scalars(run / "tensorboard" / site_run_name(site) / "steps")["loss/total"]]
        per_round = len(steps) // 2
        # Each round's actor writes its own event file, named by the second it opened; two rounds
        # opened within one second are read in process-id order, so compare the steps as a set
        # of places (each once, no gap), not in file order.
        assert per_round >= 1 and sorted(steps) == list(range(2 * per_round)), (site, steps)
        rounds = [s for s, _ in read_scalars(run / "tensorboard" / site_run_name(site))["train/loss"]]
        assert rounds == [1, 2]


def test_a_deployed_site_writes_step_curves_only_where_its_node_config_says(tmp_path: Path) -> None:
    from fedpanfm.tb import read_scalars
    from sites.step_curves import step_curves

    cfg = tiny_config()
    with step_curves({"site-name": "a", "data-dir": "x"}, "a", cfg) as on_step:
        assert on_step is None  # no tensorboard-dir: nothing written anywhere
    with step_curves({"site-name": "a", "tensorboard-dir": str(tmp_path)}, "a", cfg) as on_step:
        assert on_step is not None
        on_step(7, {"loss": 1.5, "loss/dino": 0.5, "mask_rate/liver": float("nan")})
    got = read_scalars(tmp_path / "site_a" / "steps")
    assert got == {"loss/total": [(7, 1.5)], "loss/dino": [(7, 0.5)]}
