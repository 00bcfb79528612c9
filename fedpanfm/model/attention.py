"""Multi-head self-attention with a key-padding mask, and the pre-norm transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.config import DexConfig
from fedpanfm.model.dex import DexAux, DEXLayer, PlainMLP, init_linear


class Attention(nn.Module):
    """Multi-head self-attention; padding keys are never attended.

    Args:
        dim: token width D (divisible by ``heads``).
        heads: number of heads.
        return_cls_attn: also return the CLS query's attention over all tokens (mean over
            heads). Set only on the last block: it costs one extra (1 x T) score row per head.
    """

    def __init__(self, dim: int, heads: int, return_cls_attn: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.return_cls_attn = return_cls_attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        init_linear(self.qkv)
        init_linear(self.proj)

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), pad (B, N) bool True=padding -> (out (B, N, D), cls_attn (B, N) or None).

        Every row keeps at least one valid key (CLS is never padding), so padded query rows
        yield finite values that later layers never read.
        """
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        keep = ~pad[:, None, None, :]  # (B, 1, 1, N): True = may be attended
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        cls_attn = None
        if self.return_cls_attn:
            # Same q/k as the fused kernel; softmax in float32 for the saliency statistics.
            scores = (q[:, :, :1].float() @ k.float().transpose(-2, -1)).squeeze(2) * (D // self.heads) ** -0.5
            scores = scores.masked_fill(pad[:, None, :], float("-inf"))
            cls_attn = scores.softmax(dim=-1).mean(dim=1)
        return out, cls_attn


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch, started at ``init`` (DINOv2's LayerScale).

    Starting every branch near zero keeps each block near the identity early on, so a larger
    learning rate does not tip the residual stream over before the branches have learned.
    """

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block: x = x + attn(norm1(x)); x = x + mlp(norm2(x)).

    Args:
        dim: token width D.
        heads: attention heads.
        hidden: MLP hidden width.
        dex: DEX config; ``mlp`` is a :class:`DEXLayer` when ``dex.enabled``, else a
            :class:`PlainMLP`.
        return_cls_attn: this block reports the CLS attention (the last block).
        layerscale: initial :class:`LayerScale` of both branches; 0 = no LayerScale.
    """

    def __init__(
        self, dim: int, heads: int, hidden: int, dex: DexConfig, return_cls_attn: bool = False, layerscale: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, return_cls_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp: DEXLayer | PlainMLP = DEXLayer(dim, hidden, dex) if dex.enabled else PlainMLP(dim, hidden)
        self.ls1: nn.Module = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, Tensor | None, DexAux | None]:
        """x (B, N, D), pad (B, N) -> (x, cls_attn (B, N) or None, DexAux or None)."""
        a, cls_attn = self.attn(self.norm1(x), pad)
        x = x + self.ls1(a)
        m, aux = self.mlp(self.norm2(x), pad)
        return x + self.ls2(m), cls_attn, aux


__all__ = ["Attention", "Block", "LayerScale"]
