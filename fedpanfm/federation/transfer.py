"""Which weights a site sends back, and in what precision (docs/performance.md, "Transfer").

A site's reply only needs the tensors the server reads:

- the teacher only under teacher policy "aggregate" (``required_keys``): under "server_ema" the
  server derives the teacher from the new global student, under "local" it keeps its own;
- with ``federation.sparse_experts``, only the experts the site routed gate mass to: the server
  weights an expert by each site's gate mass (``plan_means``), so an expert with zero mass has
  zero weight and its tensors would be read for nothing.

Our design (not from the papers): ``federation.sparse_expert_min_share`` widens "unused" to
experts below that share of their block's gate mass. Such an expert's reported gate mass is set
to zero, so the server's expert means and the directors' group EMA see exactly the weights the
site actually sent; the site's own copy of the expert is not changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.validation import required_keys


def unused_experts(gate_mass: Tensor, min_share: float) -> Tensor:
    """(L, E) bool: experts whose share of their block's gate mass is zero or below ``min_share``.

    Args:
        gate_mass: (L, E) gate mass the site routed to expert e of block l this round.
        min_share: share of the block's total below which an expert counts as unused (0: only
            experts with exactly zero mass).
    """
    if gate_mass.dim() != 2:
        raise ValueError(f"unused_experts: gate mass must be (L, E), got shape {tuple(gate_mass.shape)}")
    total = gate_mass.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, gate_mass / total.clamp_min(1e-300), torch.zeros_like(gate_mass))
    # A block's most-used expert is never dropped, whatever min_share says: a block with no
    # expert left would leave the site's update without any routed weight for it.
    top = share == share.max(dim=1, keepdim=True).values
    return (gate_mass <= 0) | ((share < min_share) & ~top)


def select_transfer(state: Mapping[str, Tensor], gate_mass: Tensor, cfg: ExperimentConfig) -> tuple[dict[str, Tensor], Tensor]:
    """The tensors a site sends and the gate mass it reports with them.

    Args:
        state: the site's full updated state dict (``PanFMSSL`` keys).
        gate_mass: (L, E) gate mass the site's student routed this round ((0, 0) without DEX).
        cfg: the experiment config (``federation.teacher_policy``, ``sparse_experts``,
            ``sparse_expert_min_share``).

    Returns:
        (key -> tensor to send, in ``state``'s order; the gate mass to report, with omitted
        experts at zero).
    """
    keep = set(required_keys(state, cfg))
    reported = gate_mass
    if cfg.federation.sparse_experts and gate_mass.numel():
        unused = unused_experts(gate_mass, cfg.federation.sparse_expert_min_share)
        reported = gate_mass.masked_fill(unused, 0.0)
        for key in list(keep):
            g = classify(key)
            if g.kind == "expert" and g.layer is not None and g.expert is not None and g.layer < unused.shape[0] \
                    and bool(unused[g.layer, g.expert]):
                keep.discard(key)
    return {k: t for k, t in state.items() if k in keep}, reported


__all__ = ["select_transfer", "unused_experts"]
