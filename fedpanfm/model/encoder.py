"""The pan-organ encoder: organ tokenizers -> pre-norm transformer with DEX MLPs -> norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.model.attention import Block
from fedpanfm.model.dex import DexAux, DEXLayer
from fedpanfm.model.tokenizer import PanOrganTokenizer


@dataclass
class EncoderOutput:
    """One encoder forward.

    Args:
        cls: (B, D) the normed CLS token.
        tokens: (B, 1+T, D) all normed tokens (CLS first; padding rows hold unused values).
        pad: (B, 1+T) bool, True at padding.
        organ_id: (B, 1+T) long organ id per token, -1 for CLS and padding.
        masked: (B, 1+T) bool, True where the input token was the mask token.
        cls_attn: (B, 1+T) float32 last-block CLS attention, mean over heads; sums to 1 over
            non-padding tokens (CLS included) and is exactly 0 at padding.
        dex: per block its :class:`DexAux`, or None where the block's MLP is plain.
        positions: organ -> (n_o, P_o) sequence positions (see ``TokenSet.positions``).
    """

    cls: Tensor
    tokens: Tensor
    pad: Tensor
    organ_id: Tensor
    masked: Tensor
    cls_attn: Tensor
    dex: list[DexAux | None]
    positions: dict[str, Tensor]


class PanOrganEncoder(nn.Module):
    """Pan-organ transformer encoder.

    Each submodule initialises itself (truncated normal 0.02 for linears and embeddings);
    there is deliberately no global re-initialisation, which would break the DEX invariant that
    experts start as exact copies of their director.

    Args:
        cfg: the experiment config (``model`` for widths and DEX, ``data`` for organ specs).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        m = cfg.model
        hidden = max(1, int(round(m.dim * m.mlp_ratio)))
        self.tokenizer = PanOrganTokenizer(cfg.data.organ_set(), cfg.data.organs, m.dim, m.stem_channels)
        self.blocks = nn.ModuleList(
            [
                Block(m.dim, m.heads, hidden, m.dex, return_cls_attn=(i == m.depth - 1), layerscale=m.layerscale)
                for i in range(m.depth)
            ]
        )
        self.norm = nn.LayerNorm(m.dim)

    def dex_layers(self) -> list[DEXLayer]:
        """The DEX layers, block order (empty when DEX is disabled)."""
        return [b.mlp for b in self.blocks if isinstance(b.mlp, DEXLayer)]

    def forward(
        self,
        batch: SubjectBatch,
        organ_mask: Tensor | None = None,
        patch_mask: dict[str, Tensor] | None = None,
        crops: bool = False,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
            batch: the subjects.
            organ_mask: optional (B, n_organs) bool, True = organ masked for that subject.
            patch_mask: optional organ -> (n_o, P_o) bool, True = patch masked.
            crops: the batch may hold organ crops (a local view's; ``PanOrganTokenizer.forward``).
        """
        ts = self.tokenizer(batch, organ_mask, patch_mask, crops)
        x = ts.tokens
        cls_attn: Tensor | None = None
        aux: list[DexAux | None] = []
        for block in self.blocks:
            x, attn, a = block(x, ts.pad)
            aux.append(a)
            if attn is not None:
                cls_attn = attn
        assert cls_attn is not None  # the last block always reports it
        x = self.norm(x)
        return EncoderOutput(
            cls=x[:, 0],
            tokens=x,
            pad=ts.pad,
            organ_id=ts.organ_id,
            masked=ts.masked,
            cls_attn=cls_attn,
            dex=aux,
            positions=ts.positions,
        )

    def embed(self, batch: SubjectBatch) -> Tensor:
        """(B, D) subject embeddings for probes: the normed CLS token of the unmasked view."""
        return self.forward(batch).cls


def organ_token_means(tokens: Tensor, organ_id: Tensor, pad: Tensor, n_organs: int) -> Tensor:
    """(B, O, D) mean of each organ's final tokens per subject; zero for an organ a subject lacks.

    Args:
        tokens: (B, 1+T, D) the encoder's normed tokens (CLS first).
        organ_id: (B, 1+T) organ index per token, -1 for CLS and padding.
        pad: (B, 1+T) True at padding.
        n_organs: O, the vocabulary size.
    """
    valid = (organ_id >= 0) & ~pad
    onehot = torch.nn.functional.one_hot(organ_id.clamp(min=0), n_organs).float() * valid[..., None]
    sums = torch.einsum("bto,btd->bod", onehot, tokens.float())
    return sums / onehot.sum(1).clamp(min=1.0)[..., None]


__all__ = ["EncoderOutput", "PanOrganEncoder", "organ_token_means"]
