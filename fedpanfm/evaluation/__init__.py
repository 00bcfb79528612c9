"""Evaluation of frozen encoders: disease probes, missing-organ robustness, attention balance.

Entry points: :func:`evaluate_encoder` + :func:`write_report` (the ``fedpanfm evaluate``
command), and :func:`probe_auroc` (cheap per-round probe AUROC for the server). See
docs/evaluation.md.
"""

from fedpanfm.evaluation.attention import AttentionBalance, attention_balance, normalised_entropy
from fedpanfm.evaluation.auroc import auroc, average_ranks, bootstrap_counts, percentile_ci
from fedpanfm.evaluation.baselines import baseline_macro_aurocs, baseline_scores, feature_baseline_scores
from fedpanfm.evaluation.embed import (
    Embeddings,
    collate_dataset,
    embed_batches,
    encoder_from_checkpoint,
    random_encoder,
)
from fedpanfm.evaluation.information import information_drops
from fedpanfm.evaluation.probe import (
    ProbeScores,
    ProbeSet,
    ProbeSplit,
    fit_and_score,
    fit_probes,
    probe_auroc,
    probe_split,
    score_probes,
    split_three,
)
from fedpanfm.evaluation.readouts import READOUTS, readout
from fedpanfm.evaluation.report import EvaluationResult, evaluate_encoder, write_report
from fedpanfm.evaluation.robustness import ConditionResult, robustness_conditions

__all__ = [
    "READOUTS",
    "AttentionBalance",
    "ConditionResult",
    "Embeddings",
    "EvaluationResult",
    "ProbeScores",
    "ProbeSet",
    "ProbeSplit",
    "attention_balance",
    "auroc",
    "average_ranks",
    "baseline_macro_aurocs",
    "baseline_scores",
    "bootstrap_counts",
    "collate_dataset",
    "embed_batches",
    "encoder_from_checkpoint",
    "evaluate_encoder",
    "feature_baseline_scores",
    "fit_and_score",
    "fit_probes",
    "information_drops",
    "normalised_entropy",
    "percentile_ci",
    "probe_auroc",
    "probe_split",
    "random_encoder",
    "readout",
    "robustness_conditions",
    "score_probes",
    "split_three",
    "write_report",
]
