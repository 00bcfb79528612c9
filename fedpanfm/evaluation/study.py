"""The SGM study: what federation, SGM and DEX buy, under one compute budget (docs/results.md).

Arms (``evaluation.study.arms``, names in ``fedpanfm.config.STUDY_ARMS``):

========================  ==========================================================================
``random_init``           a randomly initialised encoder (no training)
``single_site``           each training site pre-trained alone; the one with the best probe macro
                          AUROC on the evaluation cohort's *validation* subjects is reported (on test)
``centralized``           every site's training subjects pooled, SGM (``run_pretrain``)
``fed_none``              federated, organ masking ``none``   (``simulate``)
``fed_random``            federated, organ masking ``random``
``fed_sgm``               federated, organ masking ``sgm``
``fed_sgm_nodex``         federated ``sgm`` with plain MLPs (``model.dex.enabled=false``)
``supervised_factors``    our upper reference, not an arm of the comparison: the same encoder
                          trained *supervised* on the latent factors the labels read, on centralized's
                          subjects, for at least ``evaluation.study.supervised_epochs`` epochs
                          (:mod:`fedpanfm.evaluation.supervised_reference`); reported among the
                          baseline rows
========================  ==========================================================================

Baseline rows (:mod:`fedpanfm.evaluation.baselines`: ``presence``, ``pixel_stats``,
``texture_stats``, ``pca_pixels``, ``oracle``) are scored once per seed on that seed's probe split,
the split every arm of the seed is probed on (``evaluation.probe_seed + seed``). Every arm is
probed under every readout (:mod:`fedpanfm.evaluation.readouts`);
``evaluation.study.primary_readout`` decides ``macro_auroc``.

**Budget (our definition).** Every trained arm gets the same number of *subject-epochs* (one
subject passed once through a training step), ``S = rounds x local epochs x N`` with N the
training subjects of all sites (after each site's validation hold-out), and therefore the same
number of optimiser steps when each site's training count is a multiple of the batch size (the
supervised reference excepted: it is a reference, not a compared arm, and may take more steps;
on the study's 1024 training subjects it converges by ~2880, docs/results.md, "Sixteenth session"):
centralized trains ``rounds x epochs`` epochs over the pooled N; a single site k trains
``S / n_k`` epochs over its n_k; the federation trains ``epochs`` local epochs per round at
every site, steps summed over sites. :func:`plan_budget` computes it and refuses a cohort where
the arms' steps would differ. A single-site candidate gets the whole budget (the selection among
sites is the baseline's own cost). ``supervised_factors`` takes centralized's steps or
``supervised_epochs`` epochs over the pooled training subjects, whichever is more.

The federated arms run through the ``fedpanfm.federate`` entry point (``orchestration.simulate``):
the library never imports ``orchestration`` (architecture.md).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import torch

from fedpanfm.config import STUDY_ARMS, ExperimentConfig, config_from_dict
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.dataset import SiteDataset, list_sites, pooled_dataset, split_subjects
from fedpanfm.evaluation.attention import normalised_entropy
from fedpanfm.evaluation.baselines import feature_baseline_scores
from fedpanfm.evaluation.embed import (
    Embeddings,
    collate_dataset,
    embed_batches,
    encoder_from_checkpoint,
    random_encoder,
)
from fedpanfm.evaluation.factors import CohortFactors, load_cohort_factors
from fedpanfm.evaluation.probe import ProbeScores, fit_and_score, probe_split, score_probes
from fedpanfm.evaluation.readouts import readout
from fedpanfm.evaluation.report import EvaluationResult, evaluate_encoder, write_report
from fedpanfm.model.encoder import PanOrganEncoder

#: The organs the paper calls dominant; removed together for the shortcut test.
DOMINANT: tuple[str, ...] = ("adipose", "heart")

#: Federated arm -> config overrides on top of the study config.
FEDERATED_ARMS: dict[str, list[str]] = {
    "fed_none": ["train.masking.policy=none"],
    "fed_random": ["train.masking.policy=random"],
    "fed_sgm": ["train.masking.policy=sgm"],
    "fed_sgm_nodex": ["train.masking.policy=sgm", "model.dex.enabled=false"],
}

#: ``federate(config_path, overrides, run_folder, cpus) -> run summary`` (orchestration.simulate).
Federate = Callable[..., Mapping[str, Any]]
Echo = Callable[[str], None]
T = TypeVar("T")


# --------------------------------------------------------------------------- budget


@dataclass
class ArmBudget:
    """The training budget of one arm (or one single-site candidate).

    Args:
        arm: arm name (``single_site:<site>`` for a candidate).
        epochs: epochs over the arm's own training subjects (federated: local epochs x rounds).
        subjects: training subjects the arm sees (federated: summed over sites).
        steps: optimiser steps in total (federated: summed over sites).
    """

    arm: str
    epochs: int
    subjects: int
    steps: int

    @property
    def subject_epochs(self) -> int:
        return self.epochs * self.subjects


def site_train_counts(cohort_dir: Path, cfg: ExperimentConfig) -> dict[str, int]:
    """Site folder name -> training subjects after the validation hold-out (``split_subjects``,
    the rule both ``run_pretrain`` and a federated site use).

    Args:
        cohort_dir: the training cohort.
        cfg: ``data.val_fraction`` and ``seed``.
    """
    out = {}
    for site in list_sites(cohort_dir):
        train, _ = split_subjects(SiteDataset(site, cfg).subject_ids, cfg.data.val_fraction, cfg.seed)
        out[site.name] = len(train)
    return out


def _steps(subjects: int, epochs: int, cfg: ExperimentConfig) -> int:
    # LocalTrainer's count: batches per epoch (the last one may be short), over accumulation.
    return (epochs * math.ceil(subjects / cfg.data.batch_size)) // cfg.deepspeed.gradient_accumulation_steps


def plan_budget(cfg: ExperimentConfig, counts: Mapping[str, int]) -> dict[str, ArmBudget]:
    """Every arm's budget for the same subject-epochs ``rounds x epochs x N``.

    Args:
        cfg: ``federation.rounds``, ``train.epochs`` (local epochs per round), ``data.batch_size``.
        counts: site -> training subjects (:func:`site_train_counts`).

    Returns:
        arm -> budget for ``random_init`` (0 steps), ``centralized``, each federated arm, each
        ``single_site:<site>`` candidate and ``supervised_factors`` (centralized's subjects; the
        larger of centralized's steps and ``supervised_epochs`` epochs).

    Raises:
        ValueError: the trained arms' steps would differ (naming them and the fix), or a site's
            training count does not divide the budget into whole epochs.
    """
    if not counts or min(counts.values()) < 1:
        raise ValueError(f"plan_budget: every site needs training subjects, got {dict(counts)}")
    rounds, epochs = cfg.federation.rounds, cfg.train.epochs
    total = sum(counts.values())
    budget = rounds * epochs * total
    fed_steps = sum(_steps(n, rounds * epochs, cfg) for n in counts.values())
    out = {"random_init": ArmBudget("random_init", 0, 0, 0),
           "centralized": ArmBudget("centralized", rounds * epochs, total, _steps(total, rounds * epochs, cfg))}
    for arm in FEDERATED_ARMS:
        out[arm] = ArmBudget(arm, rounds * epochs, total, fed_steps)
    cen = out["centralized"]
    for site, n in counts.items():
        if budget % n:
            raise ValueError(f"plan_budget: site {site} has {n} training subjects, which does not divide the "
                             f"budget of {budget} subject-epochs into whole epochs; use equal-sized sites")
        out[f"single_site:{site}"] = ArmBudget(f"single_site:{site}", budget // n, n, _steps(n, budget // n, cfg))
    steps = {a: b.steps for a, b in out.items() if a != "random_init"}
    if len(set(steps.values())) > 1:
        raise ValueError(
            f"plan_budget: the arms would take different optimiser steps {steps}; make every site's training "
            f"count ({dict(counts)}) a multiple of data.batch_size = {cfg.data.batch_size}"
        )
    sup_epochs = max(cen.epochs, cfg.evaluation.study.supervised_epochs)
    sup_steps = max(cen.steps, sup_epochs * math.ceil(total / cfg.data.batch_size))
    out["supervised_factors"] = ArmBudget("supervised_factors", sup_epochs, total, sup_steps)
    return out


# --------------------------------------------------------------------------- evaluation of one arm


@dataclass
class ArmScore:
    """One arm's evaluation on the labelled evaluation cohort (one seed).

    Args:
        macro: test macro AUROC, all organs.
        val_macro: mean validation AUROC of the probes (what single-site selection reads).
        macro_no_dominant: test macro AUROC with adipose and heart removed at inference.
        full_same_subjects: all-organ macro AUROC on the subjects the removal condition scored.
        entropy: mean normalised CLS-attention entropy over organs (attention balance).
        dominant_attention: pooled CLS-attention share of adipose + heart.
        dominant_info: information share of adipose + heart (probes refitted without each organ;
            NaN if undefined).
        dominant_inference_info: the same share from the full-organ probes scored with each organ
            removed at inference (mixes information with the embedding's shift; for comparison).
        attention: organ -> pooled attention share; info: organ -> information share.
        body_size_r2: ridge R^2 of the body-size nuisance factor from the CLS embedding.
        signal_r2: mean ridge R^2 of the latent factors the labels read.
        participation_ratio: effective number of directions of the CLS embedding.
        readouts: readout -> test macro AUROC of probes fitted on it (same split).
        readout: the primary readout ``macro`` is measured with.
        dominant_by_subject: subject id -> its adipose + heart CLS-attention share, every
            evaluation subject (the attention claims compare arms subject by subject).
    """

    macro: float
    val_macro: float
    macro_no_dominant: float
    full_same_subjects: float
    entropy: float
    dominant_attention: float
    dominant_info: float
    dominant_inference_info: float = math.nan
    attention: dict[str, float] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)
    body_size_r2: float = math.nan
    signal_r2: float = math.nan
    participation_ratio: float = math.nan
    readouts: dict[str, float] = field(default_factory=dict)
    readout: str = "cls"
    dominant_by_subject: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def auroc_cls(self) -> float:
        return self.readouts.get("cls", math.nan)

    @property
    def auroc_organ_mean(self) -> float:
        return self.readouts.get("organ_mean", math.nan)

    @property
    def auroc_both(self) -> float:
        return self.readouts.get("both", math.nan)


def _finite_mean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def score_arm(result: EvaluationResult, encoder: PanOrganEncoder, batches: Sequence[SubjectBatch]) -> ArmScore:
    """The study's numbers from one evaluation, plus the adipose + heart removal condition.

    Args:
        result: :func:`evaluate_encoder` on ``batches`` (its probes and split are reused).
        encoder: the evaluated encoder.
        batches: the collated evaluation cohort.
    """
    test = set(result.split.test)
    full = result.embeddings if result.embeddings is not None else embed_batches(encoder, batches)
    reduced = readout(embed_batches(encoder, batches, transform=lambda _i, b: b.drop_organs(list(DOMINANT))),
                      result.readout)
    ids = [s for s in reduced.subject_ids if s in test]
    if not ids:
        raise ValueError("score_arm: no test subject keeps an organ once adipose and heart are removed")
    no_dom = score_probes(result.probes, reduced.subset(ids))
    same = score_probes(result.probes, full.subset(ids))
    b = result.balance
    attention = {o.organ: o.pooled_share for o in b.organs}
    info = {o.organ: o.info_share for o in b.organs}
    inference = {o.organ: o.inference_share for o in b.organs}
    f = result.factors
    return ArmScore(
        macro=result.scores.macro,
        val_macro=_finite_mean([p.val_auroc for p in result.probes.probes.values()]),
        macro_no_dominant=no_dom.macro,
        full_same_subjects=same.macro,
        entropy=b.entropy,
        dominant_attention=sum(attention[o] for o in DOMINANT),
        # A NaN share (undefined) makes the sum NaN: "not measured", never a pass.
        dominant_info=sum(info[o] for o in DOMINANT),
        dominant_inference_info=sum(inference[o] for o in DOMINANT),
        attention=attention,
        info=info,
        body_size_r2=math.nan if f is None else f.r2.get("body_size", math.nan),
        signal_r2=math.nan if f is None else f.signal_r2,
        participation_ratio=math.nan if f is None else f.participation_ratio,
        readouts={r: s.macro for r, s in result.readouts.items()},
        readout=result.readout,
        dominant_by_subject=dominant_shares(full),
    )


def dominant_shares(emb: Embeddings) -> dict[str, float]:
    """subject id -> the CLS-attention share of adipose + heart (0 for a subject with neither)."""
    columns = [emb.organ_names.index(o) for o in DOMINANT if o in emb.organ_names]
    shares = emb.shares[:, columns].sum(dim=1) if columns else torch.zeros(len(emb.subject_ids))
    return dict(zip(emb.subject_ids, shares.double().tolist()))


def token_reference(batches: Sequence[SubjectBatch], cfg: ExperimentConfig) -> dict[str, float]:
    """What the attention numbers would be if CLS attention were spread in proportion to token counts.

    Every organ's tokens weigh the same (``data.organs.<organ>`` patches per image); an untrained
    encoder is close to this. A dominant-organ shortcut is attention beyond it on adipose + heart.

    Args:
        batches: the collated evaluation cohort (``present`` is read).
        cfg: organ grids and patches.

    Returns:
        ``adipose_heart_attention`` (mean over subjects of adipose + heart's token share) and
        ``attention_entropy`` (mean normalised entropy of the token shares, subjects with >= 2 organs).
    """
    organs = cfg.data.organ_set().names
    tokens = torch.tensor([float(cfg.data.organs[o].num_patches) for o in organs], dtype=torch.float64)
    present = torch.cat([b.present.cpu() for b in batches])
    weight = present.double() * tokens
    shares = weight / weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    entropy = normalised_entropy(shares, present)
    return {
        "adipose_heart_attention": float(shares[:, [organs.index(o) for o in DOMINANT]].sum(dim=1).mean()),
        "attention_entropy": float(entropy[~torch.isnan(entropy)].mean()),
    }


def validation_macro(encoder: PanOrganEncoder, cfg: ExperimentConfig, batches: Sequence[SubjectBatch], seed: int) -> float:
    """Mean validation AUROC of the primary readout's probes: what :func:`evaluate_arm`'s
    ``val_macro`` is (same embeddings, split and probes), without the rest of the report."""
    emb = embed_batches(encoder, batches)
    split = probe_split(emb.subject_ids, cfg.evaluation, seed)
    probes, _ = fit_and_score(readout(emb, cfg.evaluation.study.primary_readout), split, cfg.evaluation, seed)
    return _finite_mean([p.val_auroc for p in probes.probes.values()])


def evaluate_arm(encoder: PanOrganEncoder, cfg: ExperimentConfig, batches: Sequence[SubjectBatch], seed: int,
                 out_dir: Path, title: str, factors: CohortFactors | None = None) -> ArmScore:
    """Full evaluation report of one encoder under ``out_dir`` (``fedpanfm evaluate``'s files) and its
    study numbers.

    Args:
        encoder: the frozen encoder (CPU).
        cfg: the study config (``evaluation`` section).
        batches: the collated evaluation cohort.
        seed: probe split / bootstrap / draw seed (the same for every arm of a seed: paired).
        out_dir: the report folder.
        title: the report's heading.
        factors: the evaluation cohort's latent factors (None: no factor decodability).
    """
    result = evaluate_encoder(encoder, cfg, batches, seed, factors=factors)
    write_report(result, out_dir, title=title)
    return score_arm(result, encoder, batches)


# --------------------------------------------------------------------------- the study


@dataclass
class ArmRun:
    """One arm at one seed: its scores and what it cost."""

    arm: str
    seed: int
    score: ArmScore
    steps: int
    seconds: float
    note: str = ""


@dataclass
class Candidate:
    """A trained single-site candidate: its validation macro AUROC and where its weights are."""

    site: str
    val_macro: float
    steps: int
    checkpoint: Path
    seconds: float


def choose_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The single-site candidate with the best validation macro AUROC; the first of equals."""
    if not candidates:
        raise ValueError("choose_candidate: no single-site candidate was trained")
    return max(candidates, key=lambda c: c.val_macro)  # max keeps the first of equals


def derive(cfg: ExperimentConfig, overrides: Sequence[str], src: str = "study") -> ExperimentConfig:
    """``cfg`` with ``KEY=VALUE`` overrides, checked as ``--set`` items are."""
    return config_from_dict(cfg.to_dict(), src, list(overrides))


def check_study(cfg: ExperimentConfig) -> None:
    """Reject study settings the runner cannot honour (unknown arms, no seeds)."""
    st = cfg.evaluation.study
    unknown = [a for a in st.arms if a not in STUDY_ARMS]
    if unknown:
        raise ValueError(f"evaluation.study.arms: unknown arm(s) {unknown}; known: {', '.join(STUDY_ARMS)}")
    if not st.arms or not st.seeds:
        raise ValueError("evaluation.study: needs at least one arm and one seed")
    if len(set(st.seeds)) != len(st.seeds):
        raise ValueError(f"evaluation.study.seeds: duplicate seeds {st.seeds}")


def eval_cohort_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The evaluation cohort's generator config: full-body sites from another synth seed."""
    st = cfg.evaluation.study
    if st.eval_seed == cfg.synth.seed:
        raise ValueError(f"evaluation.study.eval_seed = {st.eval_seed} equals synth.seed: the evaluation "
                         "cohort must come from a different seed than the training cohort")
    organs = list(cfg.data.organ_set())
    return derive(cfg, [f"synth.sites={st.eval_sites}", f"synth.subjects={st.eval_subjects}",
                        f"synth.seed={st.eval_seed}", f"synth.site_organs={[organs] * st.eval_sites}",
                        # Presence independent of disease: the probes must read images, not missingness.
                        "synth.presence=independent"])


def default_federate() -> Federate:
    """The federation runner registered under the ``fedpanfm.federate`` entry point (``simulate``)."""
    eps = [ep for ep in entry_points(group="fedpanfm.federate") if ep.name == "simulate"]
    if not eps:
        raise RuntimeError("no 'simulate' in the fedpanfm.federate entry points: run `pip install -e . --no-deps`")
    return eps[0].load()


def federated_steps(summary: Mapping[str, Any]) -> int:
    """Optimiser steps a federated run took: its ``summary.json`` ``site_steps`` (the steps of every
    update the server aggregated, per site, over all rounds), summed.

    Raises:
        RuntimeError: the summary holds no per-site steps.
    """
    steps = summary.get("site_steps")
    if not isinstance(steps, Mapping) or not steps:
        raise RuntimeError(f"{summary.get('run_folder', 'summary.json')}: no 'site_steps'; cannot check the "
                           "federation's budget")
    return sum(int(v) for v in steps.values())


class Study:
    """Runs the arms of ``cfg.evaluation.study`` and keeps their scores.

    Args:
        cfg: the study config (training cohort = ``cohort``; budget from ``federation.rounds``
            and ``train.epochs``).
        out: the study folder (created; must be empty or absent).
        federate: the federation runner; None = :func:`default_federate`.
        echo: where progress lines go.
    """

    def __init__(self, cfg: ExperimentConfig, out: Path, federate: Federate | None = None, echo: Echo = print) -> None:
        check_study(cfg)
        self.out = Path(out).resolve()
        if self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"study folder {self.out} is not empty; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = derive(cfg, [f"cohort={self.out / 'cohort_train'}", f"logging.run_dir={self.out / 'runs'}"])
        self.federate = federate
        self.echo = echo
        self.runs: list[ArmRun] = []
        self.budget: dict[str, ArmBudget] = {}
        self.single_site_choice: dict[int, str] = {}
        self.seconds: dict[str, float] = {}
        self.reference: dict[str, float] = {}
        self.factors: CohortFactors | None = None
        self.baselines: dict[int, dict[str, ProbeScores]] = {}
        # Baseline rows are scored once per seed (run_baselines), not beside every arm.
        self.arm_cfg = derive(self.cfg, ["evaluation.baselines=false"])

    @property
    def cpus(self) -> int:
        """Cores the study uses: ``evaluation.study.cpus``, or all of them for 0."""
        return self.cfg.evaluation.study.cpus or os.cpu_count() or 1

    # ---------------------------------------------------------------- setup

    def prepare(self) -> list[SubjectBatch]:
        """Generate both cohorts, plan the budget, collate the evaluation cohort."""
        from fedpanfm.data.synthetic import generate_cohort

        t0 = time.perf_counter()
        generate_cohort(Path(self.cfg.cohort), self.cfg)
        eval_cfg = eval_cohort_config(self.cfg)
        generate_cohort(self.out / "cohort_eval", eval_cfg)
        self.budget = plan_budget(self.cfg, site_train_counts(Path(self.cfg.cohort), self.cfg))
        (self.out / "experiment.yaml").write_text(self.cfg.to_yaml())
        batches = collate_dataset(pooled_dataset(self.out / "cohort_eval", self.cfg), self.cfg)
        self.reference = token_reference(batches, self.cfg)
        self.factors = load_cohort_factors(self.out / "cohort_eval")
        self.seconds["prepare"] = time.perf_counter() - t0
        n_eval = sum(b.size for b in batches)
        steps = self.budget["centralized"].steps
        self.echo(f"study: {len(self.cfg.evaluation.study.arms)} arms x {len(self.cfg.evaluation.study.seeds)} seeds, "
                  f"{steps} optimiser steps per trained arm, {n_eval} evaluation subjects "
                  f"({self.seconds['prepare']:.1f}s to prepare)")
        return batches

    # ---------------------------------------------------------------- arms

    def _pretrain(self, cohort: Path, run_dir: Path, overrides: list[str]) -> tuple[PanOrganEncoder, int, Path]:
        from fedpanfm.train.pretrain import run_pretrain

        cfg = derive(self.cfg, overrides)
        summary = run_pretrain(cfg, cohort, run_dir, echo=lambda _m: None)
        encoder, _ = encoder_from_checkpoint(summary.checkpoint)
        return encoder, summary.steps, summary.checkpoint

    def _check_steps(self, arm: str, planned: int, done: int) -> None:
        if planned != done:
            raise RuntimeError(f"study arm {arm}: planned {planned} optimiser steps but the run took {done}")

    def run_arm(self, arm: str, seed: int, batches: Sequence[SubjectBatch]) -> ArmRun:
        """Train (unless ``random_init``) and evaluate one arm at one seed.

        Args:
            arm: a name of ``STUDY_ARMS`` other than ``single_site`` (:meth:`train_candidate`,
                :meth:`report_single_site`).
            seed: the arm's seed (``seed`` override: init, shuffling, masks, train / val split).
            batches: the collated evaluation cohort.
        """
        t0 = time.perf_counter()
        folder = self.out / "arms" / f"{arm}_seed{seed}"
        base = [f"seed={seed}"]
        rounds_epochs = self.cfg.federation.rounds * self.cfg.train.epochs
        note = ""
        if arm == "random_init":
            encoder, steps = random_encoder(self.cfg, seed), 0
        elif arm == "centralized":
            encoder, steps, _ = self._pretrain(Path(self.cfg.cohort), folder / "train",
                                               base + ["train.masking.policy=sgm", f"train.epochs={rounds_epochs}"])
            self._check_steps(arm, self.budget[arm].steps, steps)
        elif arm == "single_site":
            # Its candidates are jobs of their own (run() schedules them): see train_candidate.
            raise ValueError("study arm single_site runs as train_candidate per site, then report_single_site")
        elif arm == "supervised_factors":
            from fedpanfm.evaluation.supervised_reference import train_factor_encoder

            plan = self.budget[arm]  # the function takes exactly these steps
            encoder = train_factor_encoder(derive(self.cfg, base), Path(self.cfg.cohort), plan.steps, seed)
            steps = plan.steps
            need = self.cfg.evaluation.study.supervised_min_subjects
            note = (f"upper reference: supervised on the latent factors, {plan.subjects} training subjects, "
                    f"{plan.steps} steps ({plan.epochs} epochs)"
                    + ("" if plan.subjects >= need else f"; below the {need} subjects a real upper reference needs"))
        elif arm in FEDERATED_ARMS:
            federate = self.federate or default_federate()
            summary = federate(self.out / "experiment.yaml", base + FEDERATED_ARMS[arm], run_folder=folder / "train",
                               cpus=self.cpus)
            if summary.get("rounds") != self.cfg.federation.rounds:
                raise RuntimeError(f"study arm {arm} seed {seed}: the federation ran {summary.get('rounds')} of "
                                   f"{self.cfg.federation.rounds} rounds (see {folder / 'train'})")
            encoder, _ = encoder_from_checkpoint(Path(summary["checkpoint_latest"]))
            steps = federated_steps(summary)
            self._check_steps(arm, self.budget[arm].steps, steps)
            note = "steps summed over sites"
        else:
            raise ValueError(f"unknown study arm {arm!r}; known: {', '.join(STUDY_ARMS)}")
        score = evaluate_arm(encoder, self.arm_cfg, batches, seed, folder / "evaluation", f"{arm}, seed {seed}",
                             self.factors)
        return ArmRun(arm, seed, score, steps, time.perf_counter() - t0, note)

    def train_candidate(self, seed: int, site: str, batches: Sequence[SubjectBatch]) -> Candidate:
        """Pre-train one single-site candidate on ``site`` alone and score it by its validation
        probes only (the full report is written for the chosen candidate alone: it was three
        quarters of a candidate's evaluation time and decides nothing)."""
        t0 = time.perf_counter()
        folder = self.out / "arms" / f"single_site_seed{seed}"
        key = f"single_site:{site}"
        # A cohort folder holding only this site (a link: the files and their cache are shared).
        cohort = folder / "cohorts" / site
        cohort.mkdir(parents=True, exist_ok=True)
        (cohort / site).symlink_to(Path(self.cfg.cohort) / site, target_is_directory=True)
        encoder, steps, checkpoint = self._pretrain(cohort, folder / site / "train",
                                                    [f"seed={seed}", "train.masking.policy=sgm",
                                                     f"train.epochs={self.budget[key].epochs}"])
        self._check_steps(key, self.budget[key].steps, steps)
        val = validation_macro(encoder, self.arm_cfg, batches, seed)
        return Candidate(site, val, steps, checkpoint, time.perf_counter() - t0)

    def report_single_site(self, seed: int, candidates: Sequence[Candidate], batches: Sequence[SubjectBatch]) -> ArmRun:
        """The ``single_site`` arm: the candidate with the best validation macro (the first of
        equals, in site order), its full report, and the candidates' cost summed."""
        t0 = time.perf_counter()
        best = choose_candidate(candidates)
        encoder, _ = encoder_from_checkpoint(best.checkpoint)
        folder = self.out / "arms" / f"single_site_seed{seed}" / best.site / "evaluation"
        score = evaluate_arm(encoder, self.arm_cfg, batches, seed, folder, f"single site {best.site}, seed {seed}",
                             self.factors)
        seconds = sum(c.seconds for c in candidates) + time.perf_counter() - t0
        return ArmRun("single_site", seed, score, best.steps, seconds, f"best by validation AUROC: {best.site}")

    def run_baselines(self, seed: int, batches: Sequence[SubjectBatch]) -> dict[str, ProbeScores]:
        """The feature baseline rows at ``seed`` (the split every arm of the seed is probed on)."""
        ids = [s for b in batches for s in b.subject_ids]
        split = probe_split(ids, self.cfg.evaluation, seed)
        rows = feature_baseline_scores(batches, self.cfg, seed, self.factors, split)
        self.baselines[seed] = rows
        self.echo(f"baselines seed {seed}: " + ", ".join(f"{k} {v.macro:.3f}" for k, v in rows.items()))
        return rows

    def run(self) -> list[ArmRun]:
        """Prepare, then every arm at every seed; :attr:`runs` and the result are seed-major.

        The arms that train on one core (single-site candidates, centralized, the supervised
        reference, random init's evaluation) run side by side in ``evaluation.study.workers``
        worker processes while this process runs the federated arms one after another on Ray
        (:func:`_study_pool`). Each job is single-threaded and seeded, so the numbers do not depend
        on the schedule; an arm's ``seconds`` is the wall time of its own jobs while others share
        the cores.
        """
        t0 = time.perf_counter()
        # One intra-op thread here: the federated arms' site actors also run one each, and on a
        # shared small machine extra threads oversubscribe the cores (measured on 2 busy cores:
        # one evaluation took 40 s with the default threads, 1.5 s with one).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        batches = self.prepare()
        _EVAL_BATCHES[self.out] = list(batches)
        st = self.cfg.evaluation.study
        done: dict[tuple[str, int], ArmRun] = {}
        pool = _study_pool(st.workers or self.cpus)
        ray_started = False
        try:
            # The longest jobs first (candidates, then centralized and the reference, random init's
            # evaluation last), so that the cores do not end the study waiting on one long job.
            candidates = {seed: [pool.submit(_candidate_job, self, seed, site.name)
                                 for site in list_sites(Path(self.cfg.cohort))]
                          for seed in st.seeds if "single_site" in st.arms}
            local = {(arm, seed): pool.submit(_run_arm_job, self, arm, seed)
                     for arm in sorted((a for a in st.arms if a not in FEDERATED_ARMS and a != "single_site"),
                                       key=lambda a: a == "random_init")
                     for seed in st.seeds}
            single: dict[int, Future[ArmRun]] = {}
            for seed in st.seeds:
                self.run_baselines(seed, batches)
            for seed in st.seeds:
                for arm in st.arms:
                    if arm in FEDERATED_ARMS:
                        ray_started = ray_started or self._start_ray()
                        self._record(self.run_arm(arm, seed, batches), done)
                    self._collect(pool, local, candidates, single, done, wait=False)
            self._collect(pool, local, candidates, single, done, wait=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _EVAL_BATCHES.pop(self.out, None)
            torch.set_num_threads(threads)
            if ray_started:
                import ray

                ray.shutdown()
        self.runs = [done[(arm, seed)] for seed in st.seeds for arm in st.arms]
        self.seconds["total"] = time.perf_counter() - t0
        return self.runs

    def _collect(self, pool: Executor, local: dict[tuple[str, int], Future[ArmRun]],
                 candidates: dict[int, list[Future[Candidate]]], single: dict[int, Future[ArmRun]],
                 done: dict[tuple[str, int], ArmRun], wait: bool) -> None:
        """Record the finished local jobs (all of them with ``wait``) and submit each seed's
        single-site report once its candidates are trained."""
        for seed, futures in list(candidates.items()):
            if wait or all(f.done() for f in futures):
                trained = [f.result() for f in futures]
                for c in trained:
                    self.echo(f"  single site {c.site}: val macro {c.val_macro:.3f}")
                # The report runs in a worker: the choice is recorded here.
                self.single_site_choice[seed] = choose_candidate(trained).site
                single[seed] = pool.submit(_single_site_job, self, seed, trained)
                del candidates[seed]
        finished = [*local.items(), *((("single_site", s), f) for s, f in single.items())]
        for key, future in finished:
            if key not in done and (wait or future.done()):
                self._record(future.result(), done)

    def _record(self, run: ArmRun, done: dict[tuple[str, int], ArmRun]) -> None:
        done[(run.arm, run.seed)] = run
        self.seconds[f"{run.arm}:{run.seed}"] = run.seconds
        s = run.score
        self.echo(f"{run.arm} seed {run.seed}: macro AUROC {s.macro:.3f}, without adipose+heart "
                  f"{s.macro_no_dominant:.3f}, entropy {s.entropy:.3f}, adipose+heart attention "
                  f"{s.dominant_attention:.2f}, {run.steps} steps, {run.seconds:.1f}s"
                  + (f" ({run.note})" if run.note else ""))

    def __getstate__(self) -> dict[str, Any]:
        # What a worker process needs: the config, folders, budget and factors; not the
        # federation runner or the echo (callables of this process), nor the results so far.
        state = dict(self.__dict__)
        state.update(federate=None, echo=_silent, runs=[], baselines={})
        return state

    def _start_ray(self) -> bool:
        # One Ray for all federated arms (simulate reuses a running one): saves a Ray start per arm.
        import logging

        import ray

        if ray.is_initialized():
            return False
        # address="local": a private Ray even where a cluster is discoverable (issue 17).
        ray.init(address="local", num_cpus=self.cpus,
                 include_dashboard=False, logging_level=logging.WARNING)
        return True


# --------------------------------------------------------------------------- worker processes

#: study folder -> the collated evaluation cohort, once per process (a worker re-reads it from
#: ``<study>/cohort_eval`` rather than receiving ~40 MB of tensors with every job).
_EVAL_BATCHES: dict[Path, list[SubjectBatch]] = {}


def _silent(_message: str) -> None:
    return None


def _eval_batches(study: Study) -> list[SubjectBatch]:
    if study.out not in _EVAL_BATCHES:
        _EVAL_BATCHES[study.out] = collate_dataset(pooled_dataset(study.out / "cohort_eval", study.cfg), study.cfg)
    return _EVAL_BATCHES[study.out]


def _run_arm_job(study: Study, arm: str, seed: int) -> ArmRun:
    return study.run_arm(arm, seed, _eval_batches(study))


def _candidate_job(study: Study, seed: int, site: str) -> Candidate:
    return study.train_candidate(seed, site, _eval_batches(study))


def _single_site_job(study: Study, seed: int, candidates: list[Candidate]) -> ArmRun:
    return study.report_single_site(seed, candidates, _eval_batches(study))


#: The niceness Ray gives its worker processes (``RAY_worker_niceness``, 15 unless set): the
#: federated arms' site actors run at it, and a study worker at niceness 0 beside them took ~96 %
#: of the cores and left the actors ~4 % (measured on 2 cores), stalling the federated arms.
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))


def _worker_setup() -> None:
    torch.set_num_threads(1)
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))


class _InlineExecutor(Executor):
    """Runs each job at submission, in this process (``workers = 1``: no process start-up)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller by future.result(), as a pool would
            future.set_exception(exc)
        return future


def _study_pool(workers: int) -> Executor:
    """``workers`` single-threaded processes (spawned: no copy of this process's Ray or torch
    threads), or this process alone for ``workers <= 1``."""
    if workers <= 1:
        return _InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup)


__all__ = [
    "DOMINANT",
    "FEDERATED_ARMS",
    "ArmBudget",
    "ArmRun",
    "ArmScore",
    "Candidate",
    "Study",
    "check_study",
    "choose_candidate",
    "default_federate",
    "derive",
    "eval_cohort_config",
    "evaluate_arm",
    "federated_steps",
    "plan_budget",
    "score_arm",
    "site_train_counts",
    "token_reference",
]
