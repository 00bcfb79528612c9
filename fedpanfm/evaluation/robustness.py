"""Missing-organ robustness: the full-organ probes scored with organs removed at inference.

Conditions (our protocol, docs/evaluation.md), all on the test subjects:

- ``full``: every organ a subject has;
- ``drop:<organ>``: that organ removed (``SubjectBatch.drop_organs``);
- ``random_k:<k>`` for k = 1 .. O-1: k of each subject's own organs removed, drawn uniformly
  and independently per subject, ``evaluation.random_draws`` draws (seeded), averaged;
- ``only:<organ>``: every organ but that one removed (only subjects with the organ remain).

Subjects a condition leaves without organs are excluded from it (``n`` / ``n_excluded``). Each
condition is also compared with the full-organ AUROC *on the same subjects* (``full_macro``), so
``drop`` measures what the removal costs, not a change in who is scored.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedpanfm.data.batch import SubjectBatch
from fedpanfm.evaluation.embed import BatchTransform, Embeddings, embed_batches, without_organs, without_per_subject
from fedpanfm.evaluation.probe import ProbeSet, score_probes
from fedpanfm.evaluation.readouts import readout
from fedpanfm.model.encoder import PanOrganEncoder


@dataclass
class ConditionResult:
    """Probe AUROC under one missing-organ condition.

    Args:
        condition: ``full``, ``drop:<organ>``, ``random_k:<k>`` or ``only:<organ>``.
        kind: ``full``, ``drop_one``, ``random_k`` or ``only_one``.
        organ: the organ removed (``drop_one``) or kept (``only_one``); '' otherwise.
        k: organs removed per subject (0 full, 1 drop_one, k random_k, -1 only_one: varies).
        n: subjects scored; n_excluded: test subjects the condition left without organs.
        macro: macro AUROC (mean over draws for ``random_k``); macro_std: std over draws.
        full_macro: full-organ macro AUROC on the same subjects; drop = full_macro - macro.
        per_label: label -> AUROC (mean over draws), NaN where undefined.
    """

    condition: str
    kind: str
    organ: str
    k: int
    n: int
    n_excluded: int
    macro: float
    macro_std: float
    full_macro: float
    drop: float
    per_label: dict[str, float] = field(default_factory=dict)


def random_drop_mask(present: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(N, O) bool: k of each subject's present organs, uniformly drawn (all when it has <= k).

    Args:
        present: (N, O) bool organ presence.
        k: organs to remove per subject.
        generator: seeded CPU generator.
    """
    u = torch.rand(present.shape, generator=generator)
    u = torch.where(present.cpu(), u, torch.full_like(u, math.inf))
    rank = u.argsort(dim=1).argsort(dim=1)
    return (rank < k) & present.cpu()


def _condition(
    name: str, kind: str, organ: str, k: int, draws: list[Embeddings], probes: ProbeSet,
    full: Embeddings, n_test: int,
) -> ConditionResult:
    macros, fulls, per_label = [], [], []
    for emb in draws:
        s = score_probes(probes, emb)
        macros.append(s.macro)
        fulls.append(score_probes(probes, full.subset(emb.subject_ids)).macro if len(emb) else math.nan)
        per_label.append(s.by_label())
    mean = _nanmean(macros)
    full_mean = _nanmean(fulls)
    finite = [m for m in macros if not math.isnan(m)]
    labels = {lab: _nanmean([p[lab] for p in per_label]) for lab in probes.label_names}
    n = round(sum(len(e) for e in draws) / len(draws))
    return ConditionResult(
        condition=name, kind=kind, organ=organ, k=k, n=n, n_excluded=n_test - n,
        macro=mean, macro_std=statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        full_macro=full_mean, drop=full_mean - mean, per_label=labels,
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def robustness_conditions(
    encoder: PanOrganEncoder,
    test_batches: Sequence[SubjectBatch],
    probes: ProbeSet,
    draws: int,
    seed: int,
    device: torch.device | str = "cpu",
    full: Embeddings | None = None,
    dropped: Mapping[str, Embeddings] | None = None,
    readout_name: str = "cls",
) -> list[ConditionResult]:
    """Score ``probes`` under every missing-organ condition on ``test_batches``.

    Args:
        encoder: the frozen encoder the probes were fitted on.
        test_batches: the test subjects, collated.
        probes: probes fitted on full-organ embeddings.
        draws: random draws per k for ``random_k``.
        seed: seeds the random draws (same seed, same removed organs).
        device: where the encoder runs.
        full: the test subjects' full-organ embeddings if already computed.
        dropped: organ -> the test subjects' embeddings with that organ removed, if already
            computed (subjects it left without organs absent).
        readout_name: the readout the probes read (:mod:`fedpanfm.evaluation.readouts`);
            ``full`` and ``dropped``, when given, must already hold it.

    Returns:
        Rows in order: full, drop:<organ> (vocabulary order), random_k:1..O-1, only:<organ>.
    """
    if draws < 1:
        raise ValueError(f"robustness_conditions: draws must be >= 1, got {draws}")
    organs = test_batches[0].organ_names

    def run(transform: BatchTransform | None) -> Embeddings:
        return readout(embed_batches(encoder, test_batches, transform, device), readout_name)

    full = full if full is not None else run(None)
    n_test = len(full)
    rows = [_condition("full", "full", "", 0, [full], probes, full, n_test)]

    for organ in organs:
        emb = dropped[organ] if dropped is not None else run(without_organs([organ]))
        rows.append(_condition(f"drop:{organ}", "drop_one", organ, 1, [emb], probes, full, n_test))
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, len(organs)):
        draw_embs = []
        for _ in range(draws):
            masks = [random_drop_mask(b.present, k, gen) for b in test_batches]
            draw_embs.append(run(without_per_subject(masks)))
        rows.append(_condition(f"random_k:{k}", "random_k", "", k, draw_embs, probes, full, n_test))
    for organ in organs:
        others = [o for o in organs if o != organ]
        emb = run(without_organs(others))
        rows.append(_condition(f"only:{organ}", "only_one", organ, -1, [emb], probes, full, n_test))
    return rows


__all__ = ["ConditionResult", "random_drop_mask", "robustness_conditions"]
