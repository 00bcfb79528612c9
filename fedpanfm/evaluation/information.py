"""What each organ is worth to the probes: macro AUROC lost when the probes are refitted without it.

Our definition (docs/evaluation.md, "Information share"). The robustness table's ``drop:<organ>``
scores the *full-organ* probes on embeddings with the organ removed; that mixes two things, the
information the organ carried and the shift of the embedding the probes were not fitted for.
Removing the most-attended organ moves the CLS so far that unrelated labels can fall below
chance (measured: removing the heart took splenomegaly from 0.71 to 0.32 for a federated
encoder). The information an organ carries is what a probe fitted *without* it cannot recover,
so here the probes are refitted on the same split with the organ removed from every subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpanfm.config import EvalConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.evaluation.embed import Embeddings, embed_batches, without_organs
from fedpanfm.evaluation.probe import ProbeSet, ProbeSplit, fit_probes, score_probes
from fedpanfm.evaluation.readouts import readout
from fedpanfm.model.encoder import PanOrganEncoder


def kept_split(split: ProbeSplit, kept: set[str]) -> ProbeSplit:
    """``split`` restricted to the subjects in ``kept`` (those a condition left with organs)."""
    return ProbeSplit(*([s for s in part if s in kept] for part in (split.train, split.val, split.test)))


def refit_drop(full: Embeddings, full_probes: ProbeSet, without: Embeddings, split: ProbeSplit, cfg: EvalConfig) -> float:
    """Macro test AUROC of ``full_probes`` on ``full`` minus that of probes refitted on ``without``.

    Args:
        full: full-organ embeddings of every subject in ``split``.
        full_probes: the probes fitted on ``full`` (train part of ``split``).
        without: embeddings with one organ removed; subjects it left with no organ are absent.
        split: the probe split of ``full``; both sides are scored on the test subjects ``without``
            still holds, so the difference is paired.
        cfg: ``cfg.evaluation`` (L2 grid, iterations).
    """
    part = kept_split(split, set(without.subject_ids))
    if not part.train or not part.val or not part.test:
        return float("nan")
    refit = fit_probes(without.subset(part.train), without.subset(part.val), cfg)
    return score_probes(full_probes, full.subset(part.test)).macro - score_probes(refit, without.subset(part.test)).macro


def embeddings_without_each(
    encoder: PanOrganEncoder, batches: Sequence[SubjectBatch], device: torch.device | str = "cpu",
    readout_name: str = "cls",
) -> dict[str, Embeddings]:
    """organ -> embeddings of ``batches`` with that organ removed from every subject.

    One pass per organ serves both :func:`information_drops` (all subjects) and the robustness
    table's ``drop:<organ>`` rows (their test subset); ``readout_name`` is the readout they hold.
    """
    organs = batches[0].organ_names
    return {o: readout(embed_batches(encoder, batches, without_organs([o]), device), readout_name)
            for o in organs}


def information_drops(
    full: Embeddings,
    without: Mapping[str, Embeddings],
    full_probes: ProbeSet,
    split: ProbeSplit,
    cfg: EvalConfig,
) -> dict[str, float]:
    """organ -> :func:`refit_drop` with that organ removed from every subject.

    Args:
        full, full_probes, split, cfg: as in :func:`refit_drop`.
        without: organ -> embeddings of every subject with the organ removed
            (:func:`embeddings_without_each`).
    """
    return {organ: refit_drop(full, full_probes, emb, split, cfg) for organ, emb in without.items()}


__all__ = ["embeddings_without_each", "information_drops", "kept_split", "refit_drop"]
