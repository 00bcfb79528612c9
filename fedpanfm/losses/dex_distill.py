"""DEX director -> expert distillation: in every DEX layer the director's output is the target.

References (REFERENCES.md, "DEX"): softmax cross-entropy over the feature dimension between the
director output (teacher, detached, temperature 0.5) and the experts' combined output, in every
layer, deeper layers weighted more.

Our reconstruction (docs/method.md):
- The student side uses the SAME temperature as the director side. Experts start as exact copies
  of the director, so at initialisation the loss sits at its minimum (the target's entropy) with
  zero gradient; a sharper student temperature would push experts away from the director even
  when they agree, which is not what a distillation target should do.
- Layer weights w_l proportional to l + 1 (l = block index), normalised over the DEX layers.
- Tokens are averaged over non-padding positions of the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch.nn.functional as F
from torch import Tensor

from fedpanfm.global_batch import mean_denominator

if TYPE_CHECKING:
    from fedpanfm.model.dex import DexAux


def depth_weights(layer_ids: Sequence[int]) -> list[float]:
    """Weights proportional to ``l + 1`` for the given block indices, summing to 1."""
    raw = [float(l + 1) for l in layer_ids]
    total = sum(raw)
    return [r / total for r in raw]


def token_cross_entropy(student: Tensor, target: Tensor, keep: Tensor, temperature: float) -> Tensor:
    """Mean over kept tokens of -sum_d softmax(target/T)_d * log_softmax(student/T)_d.

    Args:
        student: (B, T, D) expert output (gets the gradient).
        target: (B, T, D) director output (detached here).
        keep: (B, T) bool, True at tokens that count (non-padding).
        temperature: softmax temperature applied to both sides.
    """
    if student.shape != target.shape or keep.shape != student.shape[:2]:
        raise ValueError(
            f"dex distill: expert_out {tuple(student.shape)}, director_out {tuple(target.shape)} and "
            f"keep mask {tuple(keep.shape)} must be (B, T, D), (B, T, D), (B, T)"
        )
    t = F.softmax(target.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    ce = -(t * log_s).sum(dim=-1)
    n = keep.sum()
    # The mean over the site's global batch's tokens when data-parallel ranks share it.
    denominator = mean_denominator(n)
    if int(n) == 0:
        return student.sum() * 0.0
    return (ce * keep).sum() / denominator


def dex_distill_loss(aux: Sequence["DexAux | None"], temperature: float) -> Tensor | None:
    """Depth-weighted director -> expert distillation over the DEX layers of one forward.

    Args:
        aux: one entry per block (``EncoderOutput.dex``); ``None`` for non-DEX blocks. Layers whose
            ``director_out`` is ``None`` (director not evaluated) are skipped.
        temperature: ``cfg.model.dex.distill_temperature``.

    Returns the scalar loss, or ``None`` when no layer has a director output.
    """
    layers = [(l, a, a.director_out) for l, a in enumerate(aux) if a is not None and a.director_out is not None]
    if not layers:
        return None
    weights = depth_weights([l for l, _, _ in layers])
    total: Tensor | None = None
    for w, (_, a, director_out) in zip(weights, layers):
        term = w * token_cross_entropy(a.expert_out, director_out, ~a.pad, temperature)
        total = term if total is None else total + term
    return total
