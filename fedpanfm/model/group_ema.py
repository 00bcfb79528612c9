"""Group EMA (GEMA) of a DEX director from its experts (REFERENCES.md, DEX).

    theta_D <- m * theta_D + (1 - m) * sum_e w_e * theta_e      (parameter by parameter)

with ``w`` normalised to sum to 1. The same maths serves the site (in place, on a live
:class:`~fedpanfm.model.dex.DEXLayer`) and the server (on state-dict tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def normalise_weights(weights: Tensor, n_experts: int) -> Tensor:
    """``weights`` (E,) as float64 shares summing to 1.

    Raises ValueError on a wrong length, a negative or non-finite weight, or an all-zero vector.
    """
    w = torch.as_tensor(weights).detach().to(torch.float64).flatten().cpu()
    if w.numel() != n_experts:
        raise ValueError(f"group EMA: {w.numel()} weights for {n_experts} experts")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"group EMA: weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("group EMA: all expert weights are zero")
    return w / total


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"group EMA: momentum {momentum} outside [0, 1]")


def _mix(director: Tensor, experts: Sequence[Tensor], w: Tensor, momentum: float) -> Tensor:
    """m * director + (1 - m) * sum_e w_e * experts[e], computed in float32 (or float64) and
    returned in the director's dtype, so bf16 weights do not lose the small EMA step."""
    acc = torch.float64 if director.dtype == torch.float64 else torch.float32
    # One accumulator, each expert added in place: no stacked copy of all experts (the server
    # runs this on ~100M-parameter states, docs/performance.md item 5).
    out = director.detach().to(acc, copy=True).mul_(momentum)
    for e, wi in zip(experts, w.tolist()):
        if wi:
            out.add_(e.detach().to(director.device), alpha=(1.0 - momentum) * wi)
    return out.to(director.dtype)


def group_ema(
    director: dict[str, Tensor],
    experts: list[dict[str, Tensor]],
    weights: Tensor,
    momentum: float,
) -> dict[str, Tensor]:
    """The group-EMA update on state dicts (the server's use).

    Args:
        director: the director's tensors, key -> tensor.
        experts: one dict per expert with exactly the director's keys and shapes.
        weights: (E,) non-negative expert weights (normalised here), e.g. routed gate mass.
        momentum: m in [0, 1]; 1 keeps the director, 0 replaces it by the weighted expert mean.

    Returns:
        a new dict with the updated director tensors (inputs untouched).
    """
    _check_momentum(momentum)
    if not experts:
        raise ValueError("group EMA: no experts")
    w = normalise_weights(weights, len(experts))
    for e, ex in enumerate(experts):
        if set(ex) != set(director):
            diff = sorted(set(ex) ^ set(director))
            raise ValueError(f"group EMA: expert {e} keys differ from the director's at {diff[0]!r}")
        for key, t in director.items():
            if ex[key].shape != t.shape:
                raise ValueError(
                    f"group EMA: key {key!r}: expert {e} shape {tuple(ex[key].shape)} != director {tuple(t.shape)}"
                )
    return {key: _mix(t, [ex[key] for ex in experts], w, momentum) for key, t in director.items()}


@torch.no_grad()
def group_ema_module_(director: nn.Module, experts: Sequence[nn.Module], weights: Tensor, momentum: float) -> Tensor:
    """The group-EMA update in place on modules (a DEX layer's own use).

    Args:
        director: module whose parameters are overwritten.
        experts: modules of the director's structure.
        weights: (E,) non-negative expert weights (normalised here).
        momentum: m in [0, 1].

    Returns:
        the normalised weights (E,) float64 that were used.
    """
    _check_momentum(momentum)
    w = normalise_weights(weights, len(experts))
    expert_params = [dict(e.named_parameters()) for e in experts]
    named = list(director.named_parameters())
    for key, p in named:
        for e, ex in enumerate(expert_params):
            if key not in ex or ex[key].shape != p.shape:
                raise ValueError(f"group EMA: key {key!r} missing or of another shape in expert {e}")
    targets: list[Tensor] = [p for _, p in named]
    if any(p.dtype not in (torch.float32, torch.float64) for p in targets):
        # 16-bit directors: mix in float32 (see _mix) so the small EMA step is not rounded away.
        for key, p in named:
            p.copy_(_mix(p, [ex[key] for ex in expert_params], w, momentum))
        return w
    # In place over all of the director's tensors at once (one foreach op per expert): this runs
    # after every optimiser step, where the stack + tensordot of _mix cost a copy of all experts.
    torch._foreach_mul_(targets, momentum)
    for e, ex in enumerate(expert_params):
        if float(w[e]) > 0:
            torch._foreach_add_(targets, [ex[key].detach() for key, _ in named], alpha=(1.0 - momentum) * float(w[e]))
    return w


__all__ = ["group_ema", "group_ema_module_", "normalise_weights"]
