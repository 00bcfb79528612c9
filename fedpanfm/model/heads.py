"""The DINO projection head, shared by the CLS token and the patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.model.dex import init_linear


class NormalizedLinear(nn.Module):
    """A bias-free linear layer whose weight rows are L2-normalised at every call.

    This is weight normalisation with the gain fixed to 1 (DINO's ``norm_last_layer``), written
    directly instead of the deprecated ``torch.nn.utils.weight_norm``: each output is the cosine
    between the (normalised) input and one prototype.

    Args:
        in_dim: input width.
        out_dim: number of prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1))


class DINOHead(nn.Module):
    """MLP (3 linear layers, GELU) -> L2-normalise -> weight-normalised prototypes.

    Args:
        in_dim: encoder width D.
        hidden_dim: MLP hidden width.
        bottleneck_dim: width of the normalised bottleneck.
        out_dim: number of prototypes K (the logits' width).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                init_linear(m)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> logits (..., out_dim), each in [-1, 1]."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


__all__ = ["DINOHead", "NormalizedLinear"]
