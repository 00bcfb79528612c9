"""The SGM study: budget accounting, target checks and a micro study run end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import make_batch, tiny_config
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedpanfm.config import ConfigError
from fedpanfm.data.synthetic import METADATA_NAME, generate_cohort
from fedpanfm.evaluation.embed import collate_dataset, embed_batches, random_encoder
from fedpanfm.evaluation.factors import load_cohort_factors, ridge_r2
from fedpanfm.evaluation.study import (
    ArmRun,
    ArmScore,
    Study,
    check_study,
    derive,
    federated_steps,
    plan_budget,
    token_reference,
)
from fedpanfm.evaluation.study_report import (
    TABLE_HEADER,
    check_targets,
    headroom_line,
    paired_gap,
    targets_table,
    write_study,
)
from fedpanfm.evaluation.supervised_reference import train_factor_encoder
from fedpanfm.train.pretrain import pooled_split


def _cfg(extra: list[str] | None = None):
    return tiny_config(["data.batch_size=2", "federation.rounds=2", "train.epochs=1", *(extra or [])])


def test_budget_gives_every_trained_arm_the_same_steps_and_subject_epochs() -> None:
    cfg = _cfg()
    budget = plan_budget(cfg, {"a": 6, "b": 6, "c": 6})
    trained = {k: v for k, v in budget.items() if k not in ("random_init", "supervised_factors")}
    # 2 rounds x 1 epoch x 18 subjects = 36 subject-epochs; batch 2 -> 18 steps for every arm.
    assert {b.steps for b in trained.values()} == {18}
    assert {b.subject_epochs for b in trained.values()} == {36}
    assert budget["centralized"].epochs == 2 and budget["centralized"].subjects == 18
    assert budget["single_site:a"].epochs == 6 and budget["single_site:a"].subjects == 6
    assert budget["fed_sgm"].epochs == 2 and budget["fed_sgm_nodex"].steps == 18
    assert budget["random_init"].steps == 0
    # The supervised reference: the same 18 subjects for at least evaluation.study.supervised_epochs
    # (default 10) epochs, 9 batches each: 90 steps, more than the arms' 18.
    assert budget["supervised_factors"].subjects == 18 and budget["supervised_factors"].epochs == 10
    assert budget["supervised_factors"].steps == 90
    assert plan_budget(_cfg(["evaluation.study.supervised_epochs=1"]), {"a": 6, "b": 6, "c": 6})[
        "supervised_factors"].steps == 18  # never fewer than the arms' budget


def test_budget_refuses_unequal_steps_and_fractional_epochs() -> None:
    # 5 training subjects with batch 2: a site's last batch is short, so a federation takes more
    # steps (3 per site-epoch) than centralized over the pooled 10 (5 per epoch).
    with pytest.raises(ValueError, match="different optimiser steps"):
        plan_budget(_cfg(), {"a": 5, "b": 5})
    with pytest.raises(ValueError, match="site a has 6 training subjects"):
        plan_budget(_cfg(["data.batch_size=1"]), {"a": 6, "b": 4})


def test_study_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown arm"):
        check_study(_cfg(["evaluation.study.arms=[fed_sgm, fedavg]"]))
    with pytest.raises(ValueError, match="duplicate seeds"):
        check_study(_cfg(["evaluation.study.seeds=[1, 1]"]))
    with pytest.raises(ConfigError, match="eval_subjects"):
        _cfg(["evaluation.study.eval_subjects=1"])


def test_token_reference_by_hand() -> None:
    cfg = _cfg()  # tokens: brain 8, heart 16, adipose 16, liver 8, kidney / spleen / pancreas 4 each
    every = list(cfg.data.organ_set())
    ref = token_reference([make_batch(cfg, [every, ["heart", "liver"]])], cfg)
    # Adipose + heart: 32 of 60 tokens, and 16 of 24; mean (8/15 + 2/3) / 2 = 0.6.
    assert ref["adipose_heart_attention"] == pytest.approx(0.6)
    p1 = torch.tensor([8, 16, 16, 8, 4, 4, 4], dtype=torch.float64) / 60
    h1 = float(-(p1 * p1.log()).sum() / math.log(7))
    h2 = float(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2))
    assert ref["attention_entropy"] == pytest.approx((h1 + h2) / 2)


def test_federated_steps_sums_every_site_and_round() -> None:
    # summary.json's site_steps: each site's steps over every round the server aggregated.
    assert federated_steps({"site_steps": {"site_a": 6, "site_b": 7}}) == 13
    for bad in ({}, {"site_steps": {}}, {"site_steps": [3]}):
        with pytest.raises(RuntimeError, match="site_steps"):
            federated_steps(bad)


def _score(macro: float, no_dom: float = math.nan, att: float = 0.5, info: float = 0.3,
           spread: float = 0.0) -> ArmScore:
    # 100 evaluation subjects whose adipose + heart shares average `att` (+- spread).
    per_subject = {f"s{i}": att + spread * (1 if i % 2 else -1) for i in range(100)}
    return ArmScore(macro=macro, val_macro=macro, macro_no_dominant=no_dom, full_same_subjects=macro, entropy=0.9,
                    dominant_attention=att, dominant_info=info, readouts={"cls": macro},
                    dominant_by_subject=per_subject)


def test_targets_are_checked_per_seed_with_margins() -> None:
    runs = []
    for seed, sgm in ((0, 0.80), (1, 0.70)):
        runs += [ArmRun("random_init", seed, _score(0.62), 0, 1.0),
                 ArmRun("single_site", seed, _score(0.70), 18, 1.0),
                 ArmRun("centralized", seed, _score(0.80), 18, 1.0),
                 ArmRun("fed_none", seed, _score(0.75, no_dom=0.60, att=0.70, info=0.20), 18, 1.0),
                 ArmRun("fed_sgm", seed, _score(sgm, no_dom=0.63 if seed == 0 else 0.61, att=0.40), 18, 1.0)]
    got = {(t.claim, t.seed): t for t in check_targets(runs)}
    r0, r1 = got[("fed_sgm >= random_init + 0.10", 0)], got[("fed_sgm >= random_init + 0.10", 1)]
    assert (r0.holds, r1.holds) == (True, False)
    assert r0.margin == pytest.approx(0.08) and r1.margin == pytest.approx(-0.02)
    assert r0.verdict == "pass" and r1.verdict == "**miss**"
    cen = got[("fed_sgm >= 0.97 x centralized", 1)]
    assert cen.holds is False and cen.margin == pytest.approx(0.70 - 0.776)
    assert got[("fed_sgm >= single_site + 0.05", 0)].margin == pytest.approx(0.05)
    drop = "adipose + heart removed: fed_sgm - fed_none >= 0.02"
    assert got[(drop, 0)].holds is True and got[(drop, 1)].holds is False
    assert got[(drop, 1)].margin == pytest.approx(-0.01)
    info_share = got[("fed_none shows the shortcut: adipose + heart attention > 1.5 x their information share", 0)]
    assert info_share.holds is True and info_share.margin == pytest.approx(0.70 - 0.30)
    # Subject by subject, fed_none attends 0.70 - 0.50 more than random_init, fed_sgm 0.30 less.
    beyond = got[("fed_none shows the shortcut: adipose + heart attention > random_init's (95 % paired bootstrap)", 0)]
    assert beyond.holds is True and beyond.margin == pytest.approx(0.20)
    lowers = "SGM lowers adipose + heart attention: fed_sgm < fed_none (95 % paired bootstrap)"
    assert got[(lowers, 0)].holds is True and got[(lowers, 0)].margin == pytest.approx(0.30)
    md = targets_table(check_targets(runs))
    assert "| fed_sgm >= random_init + 0.10 | pass (+0.080) | **miss** (-0.020) | **miss** |" in md
    # An arm not run leaves its claims "not run"; a NaN value leaves them "not measured".
    partial = check_targets([ArmRun("fed_sgm", 0, _score(0.7), 18, 1.0), ArmRun("fed_none", 0, _score(0.6), 18, 1.0)])
    by = {t.claim: t for t in partial}
    assert by["fed_sgm >= random_init + 0.10"].verdict == "not run"
    assert by["fed_sgm >= random_init + 0.10"].not_run == ("random_init",)
    assert by[drop].verdict == "not measured" and math.isnan(by[drop].margin)


def test_micro_study_end_to_end(tmp_path) -> None:
    """Two tiny sites, four arms, one seed: trains, evaluates and writes the table."""
    cfg = _cfg([
        "synth.sites=2", "synth.subjects=8", "data.val_fraction=0.25", "federation.rounds=1",
        "evaluation.study.seeds=[3]",
        "evaluation.study.arms=[random_init, single_site, centralized, supervised_factors]",
        "evaluation.study.eval_sites=1", "evaluation.study.eval_subjects=40", "evaluation.bootstrap=20",
        "evaluation.random_draws=1",
    ])
    lines: list[str] = []
    study = Study(cfg, tmp_path / "study", echo=lines.append)
    runs = study.run()
    arms = ["random_init", "single_site", "centralized", "supervised_factors"]
    assert [(r.arm, r.seed) for r in runs] == [(a, 3) for a in arms]
    # 2 sites x 6 training subjects, batch 2, 1 round x 1 epoch: 6 steps; realised == planned.
    assert study.budget["centralized"].steps == 6
    # The supervised reference: 10 epochs (evaluation.study.supervised_epochs) over the 12 subjects.
    assert [r.steps for r in runs] == [0, 6, 6, 60]
    assert "12 training subjects, 60 steps" in runs[3].note and "below the 768 subjects" in runs[3].note
    chosen = study.single_site_choice[3]
    assert chosen in {"site_00_neuro_cardiac", "site_01_abdominal"}
    # Candidates are chosen by their validation probes alone; the chosen one's full report is
    # written, and the echoed validation figure is the report's own val_macro.
    single = tmp_path / "study" / "arms" / "single_site_seed3"
    assert [p.parent.name for p in single.glob("*/evaluation")] == [chosen]
    assert f"  single site {chosen}: val macro {runs[1].score.val_macro:.3f}" in lines
    for r in runs:
        s = r.score
        assert 0.0 <= s.macro <= 1.0 and 0.0 <= s.entropy <= 1.0
        assert s.dominant_attention == pytest.approx(s.attention["adipose"] + s.attention["heart"])
        assert sum(s.attention.values()) == pytest.approx(1.0, abs=1e-5)
        assert set(s.readouts) == {"cls", "organ_mean", "both"} and s.readout == "cls"
        assert s.macro == s.readouts["cls"]  # the primary readout decides macro_auroc
    # Baseline rows once per seed, on the split every arm of the seed is probed on.
    assert set(study.baselines[3]) == {"presence", "pixel_stats", "texture_stats", "pca_pixels", "oracle"}
    assert all(0.0 <= v.macro <= 1.0 for v in study.baselines[3].values())
    assert 0.0 < study.reference["adipose_heart_attention"] < 1.0
    paths = write_study(runs, study.out, study.budget, study.seconds, study.single_site_choice, "fedpanfm study (test)",
                        study.reference, study.baselines, study.cfg.to_dict(), commit="abc123")
    with paths["table.csv"].open() as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == TABLE_HEADER
    assert [r[0] for r in rows[1:]] == arms
    assert all(r[1] == "1" for r in rows[1:])
    # One seed: std 0 where the metric is defined.
    std = rows[0].index("macro_auroc_std")
    assert all(float(r[std]) == 0.0 for r in rows[1:])
    md = paths["results.md"].read_text()
    assert "| centralized | 1 |" in md and "## Targets (issue 14)" in md and "| not run |" in md
    assert "| pca_pixels |" in md and "| texture_stats |" in md and "| oracle |" in md
    latest = json.loads(paths["study-latest.json"].read_text())
    assert latest["commit"] == "abc123" and latest["command"] == "fedpanfm study (test)"
    assert set(latest["arms"]) == {"random_init", "single_site", "centralized"} and latest["seeds"] == [3]
    cen = next(r for r in runs if r.arm == "centralized").score
    assert latest["arms"]["centralized"]["macro_auroc"] == [pytest.approx(cen.macro)]
    assert latest["arms"]["centralized"]["macro_auroc_without_adipose_heart"] == [pytest.approx(cen.macro_no_dominant)]
    assert latest["arms"]["centralized"]["macro_auroc_organ_mean"] == [pytest.approx(cen.readouts["organ_mean"])]
    assert latest["baselines"]["presence"]["macro_auroc"] == [pytest.approx(study.baselines[3]["presence"].macro)]
    assert latest["baselines"]["supervised_factors"]["steps"] == [60]
    assert latest["config"]["evaluation"]["study"]["primary_readout"] == "cls"
    sup = next(r for r in runs if r.arm == "supervised_factors").score.macro
    assert f"Headroom: supervised_factors - random_init = {sup - runs[0].score.macro:+.3f} macro AUROC" in md
    assert "Token-proportional reference" in md
    for name in ("runs.csv", "study.json", "study_auroc.png", "study_attention.png"):
        assert paths[name].stat().st_size > 0
    # Every arm also has the full `fedpanfm evaluate` report.
    assert (study.out / "arms" / "centralized_seed3" / "evaluation" / "robustness.csv").is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        Study(cfg, study.out)


def test_study_numbers_do_not_depend_on_the_worker_processes(tmp_path) -> None:
    """The same micro study in two worker processes and in this process alone: every number,
    the single-site choice and each candidate's echoed validation figure agree exactly."""
    cfg = _cfg([
        "synth.sites=2", "synth.subjects=8", "data.val_fraction=0.25", "federation.rounds=1",
        "evaluation.study.seeds=[3, 4]", "evaluation.study.arms=[single_site, centralized]",
        "evaluation.study.eval_sites=1", "evaluation.study.eval_subjects=40", "evaluation.bootstrap=20",
        "evaluation.random_draws=1",
    ])
    results = {}
    for workers in (2, 1):
        lines: list[str] = []
        study = Study(derive(cfg, [f"evaluation.study.workers={workers}"]), tmp_path / f"w{workers}",
                      echo=lines.append)
        runs = study.run()
        results[workers] = (runs, study.single_site_choice, sorted(x for x in lines if x.startswith("  single site")))
        # Seed-major whatever order the jobs finished in.
        assert [(r.arm, r.seed) for r in runs] == [("single_site", 3), ("centralized", 3),
                                                    ("single_site", 4), ("centralized", 4)]
        # Two candidates per seed, each echoed once.
        assert len(results[workers][2]) == 4
    (pool_runs, pool_choice, pool_lines), (inline_runs, inline_choice, inline_lines) = results[2], results[1]
    assert pool_choice == inline_choice and pool_lines == inline_lines
    for a, b in zip(pool_runs, inline_runs, strict=True):
        assert (a.arm, a.seed, a.steps, a.note) == (b.arm, b.seed, b.steps, b.note)
        assert a.score.macro == b.score.macro and a.score.val_macro == b.score.val_macro
        assert a.score.readouts == b.score.readouts and a.score.attention == b.score.attention
        assert a.score.dominant_by_subject == b.score.dominant_by_subject


# --------------------------------------------------------------------------- the supervised reference


@pytest.fixture(scope="module")
def factor_cohort(tmp_path_factory):
    """One full-body site of 32 subjects (24 train after the hold-out), disease shown 4x."""
    cfg = tiny_config(["synth.sites=1", "synth.subjects=32", "synth.disease_signal=4", "data.val_fraction=0.25",
                       "synth.site_organs=[[brain, heart, adipose, liver, kidney, spleen, pancreas]]"])
    cohort = tmp_path_factory.mktemp("factor_cohort")
    generate_cohort(cohort, cfg)
    return cfg, cohort


def test_factor_encoder_takes_exact_steps_and_carries_the_factors(factor_cohort) -> None:
    cfg, cohort = factor_cohort
    steps = []
    hook = register_optimizer_step_post_hook(lambda opt, *_: steps.append(id(opt)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study runs it; more threads only contend on a shared machine
    try:
        # 93 steps of batch 4 over 24 training subjects: 15.5 epochs, the last one cut part-way.
        # Without augmentation, so that on 24 subjects it fits its targets (what is checked below).
        encoder = train_factor_encoder(derive(cfg, ["train.augment.enabled=false"]), cohort, steps=93, seed=0)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    assert len(steps) == 93 and len(set(steps)) == 1  # one optimiser, exactly 93 steps
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # Decodability of the factors the labels read, on the training subjects: ridge fitted on every
    # other training subject, scored on the rest. Paired with the same seed's untrained encoder.
    train, _ = pooled_split(cohort, cfg)
    batches = collate_dataset(train, cfg)
    factors, signal, nuisance = load_cohort_factors(cohort)
    names = [f for f in signal if f not in nuisance]
    median, best = {}, {}
    for name, enc in (("supervised", encoder), ("untrained", random_encoder(cfg, 0))):
        emb = embed_batches(enc, batches)
        assert len(emb) == 24
        y = torch.tensor([[factors[s][f] for f in names] for s in emb.subject_ids], dtype=torch.float64)
        r2 = ridge_r2(emb.cls[0::2], y[0::2], emb.cls[1::2], y[1::2], l2=10.0)  # one R^2 per factor
        median[name], best[name] = float(r2.median()), float(r2.max())
    # Measured at 96 steps, seeds 0-4: median factor R^2 supervised 0.27 .. 0.57, untrained
    # -1.30 .. -0.39; best factor 0.75 .. 0.85 vs -0.05 .. 0.29 (the mean is swayed by one factor).
    assert median["supervised"] > 0.1 and median["supervised"] > median["untrained"] + 0.4, median
    assert best["supervised"] > best["untrained"] + 0.3, best


def test_factor_encoder_refuses_a_cohort_without_factors(tmp_path) -> None:
    cfg = tiny_config(["synth.sites=1", "synth.subjects=4"])
    cohort = tmp_path / "real_like"
    generate_cohort(cohort, cfg)
    (cohort / METADATA_NAME).unlink()  # what a real cohort looks like: no latent factors
    for factors_csv in cohort.glob("*/factors.csv"):
        factors_csv.unlink()
    with pytest.raises(ValueError, match=f"cohort {cohort} has no latent factors"):
        train_factor_encoder(cfg, cohort, steps=1, seed=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_factor_encoder(cfg, cohort, steps=0, seed=0)


def _run(arm: str, seed: int, macro: float) -> ArmRun:
    score = ArmScore(macro=macro, val_macro=macro, macro_no_dominant=macro - 0.02, full_same_subjects=macro,
                     entropy=0.9, dominant_attention=0.5, dominant_info=0.3,
                     attention={"adipose": 0.3, "heart": 0.2}, info={"adipose": 0.2, "heart": 0.1})
    return ArmRun(arm, seed, score, 0 if arm == "random_init" else 18, 1.0)


def test_report_of_a_subset_of_arms(tmp_path) -> None:
    """A study run with only random_init and supervised_factors: every target is "not run", the
    headroom line is written from the means over seeds."""
    runs = [_run("random_init", 0, 0.55), _run("supervised_factors", 0, 0.70),
            _run("random_init", 1, 0.57), _run("supervised_factors", 1, 0.74)]
    budget = plan_budget(_cfg(), {"a": 6, "b": 6, "c": 6})
    paths = write_study(runs, tmp_path, budget, {"total": 2.0, "prepare": 1.0}, {}, "fedpanfm study (test)")
    md = paths["results.md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and ("fed_sgm" in line or "fed_none" in line)]
    assert len(rows) == 7 and all(r.endswith("| not run | not run | n/a |") for r in rows)
    # (0.70 + 0.74) / 2 - (0.55 + 0.57) / 2 = 0.16
    assert ("Headroom: supervised_factors - random_init = +0.160 macro AUROC (the most a linear probe on this "
            "architecture gained here when told the factors)") in md
    assert md.index("Headroom:") > md.index("## Targets (issue 14)")
    assert "| supervised_factors | 2 |" in md
    for name in ("study_auroc.png", "study_attention.png", "study.json", "table.csv"):
        assert paths[name].stat().st_size > 0
    # Without the reference arm there is no headroom line.
    (tmp_path / "alone").mkdir()
    alone = write_study(runs[::2], tmp_path / "alone", budget, {}, {})
    assert "Headroom" not in alone["results.md"].read_text()
    assert headroom_line({"random_init": {"macro_auroc_mean": 0.5}}) == ""


def test_paired_attention_gap_is_a_bootstrap_interval_over_subjects() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = _score(0.6), _score(0.6)
    noise = torch.randn(400, generator=g, dtype=torch.float64)
    a.dominant_by_subject = {f"s{i}": 0.40 + 0.01 + 0.1 * float(noise[i]) for i in range(400)}
    b.dominant_by_subject = {f"s{i}": 0.40 for i in range(400)} | {"only_b": 0.9}
    mean, lo, hi = paired_gap(a, b)
    gap = 0.01 + 0.1 * noise.numpy()
    assert mean == pytest.approx(gap.mean())
    # The percentile interval of a mean: about mean +- 1.96 standard errors.
    se = gap.std(ddof=1) / math.sqrt(len(gap))
    assert lo == pytest.approx(gap.mean() - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(gap.mean() + 1.96 * se, abs=0.3 * se)
    # A 0.002 difference within that noise is no evidence either way: the SGM claim misses.
    none = _score(0.6, att=0.402, spread=0.1)
    sgm = _score(0.6, att=0.400)
    sgm.dominant_by_subject = {k: v - 0.002 + (0.05 if int(k[1:]) % 3 else -0.1) for k, v in
                               none.dominant_by_subject.items()}
    runs = [ArmRun("fed_none", 0, none, 18, 1.0), ArmRun("fed_sgm", 0, sgm, 18, 1.0)]
    lowers = next(t for t in check_targets(runs) if t.claim.startswith("SGM lowers"))
    assert lowers.holds is False
    # No subject in common: not measured, never a pass.
    none.dominant_by_subject = {}
    lowers = next(t for t in check_targets(runs) if t.claim.startswith("SGM lowers"))
    assert lowers.holds is None and lowers.verdict == "not measured"
