"""Load-balance loss for the image-wise DEX routers (Switch-Transformer style).

For one layer with E experts, B images and top-k routing:
    f_e = share of the B*k routing slots assigned to expert e,
    P_e = mean over images of the router probability of expert e,
    L   = E * sum_e f_e * P_e,
which is 1 when routing is perfectly balanced (f_e = P_e = 1/E) and approaches E when every image
goes to one expert. Only P carries a gradient (f is a count). The layer losses are averaged.
References: a load-balance loss is part of DEX (REFERENCES.md); the Switch form is our choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from fedpanfm.global_batch import all_sum

if TYPE_CHECKING:
    from fedpanfm.model.dex import DexAux


def switch_balance(probs: Tensor, topk: Tensor) -> Tensor:
    """E * sum_e f_e * P_e for one layer.

    Args:
        probs: (B, E) router probabilities over all experts.
        topk: (B, k) long, the experts each image was routed to.
    """
    if probs.dim() != 2 or topk.dim() != 2 or probs.shape[0] != topk.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"balance loss: probs {tuple(probs.shape)} must be (B, E) and topk {tuple(topk.shape)} (B, k), B > 0")
    n_experts = probs.shape[1]
    counts = torch.zeros(n_experts, device=probs.device, dtype=torch.float32)
    counts.index_add_(0, topk.reshape(-1), torch.ones(topk.numel(), device=probs.device))
    # f over the site's global batch when data-parallel ranks share it (fedpanfm/global_batch.py):
    # with it, the ranks' share-weighted losses are the global batch's (P is a mean over images).
    counts = all_sum(counts)
    f = counts / counts.sum()
    p = probs.float().mean(dim=0)
    return n_experts * (f * p).sum()


def load_balance_loss(aux: Sequence["DexAux | None"]) -> Tensor | None:
    """Mean of :func:`switch_balance` over the DEX layers (``None`` entries skipped).

    Args:
        aux: one entry per block (``EncoderOutput.dex``).

    Returns ``None`` when the model has no DEX layer.
    """
    layers = [a for a in aux if a is not None]
    if not layers:
        return None
    return torch.stack([switch_balance(a.probs, a.topk) for a in layers]).mean()
