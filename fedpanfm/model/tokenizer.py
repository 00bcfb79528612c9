"""Organ tokenizers: each organ's image becomes patch tokens; a batch becomes padded sequences.

Every organ has its own patch embedding (its grid may be 2D or 3D, of any size), its own
learned positional embedding and a learned organ embedding. A subject's sequence is
``[CLS] + tokens of its organs in vocabulary order``, padded at the end to the longest subject
of the batch. A missing organ contributes no tokens at all.

Our design for masking (Pan-FM gives no formula): a masked organ or patch keeps its positions,
but its patch tokens are replaced by the learned ``mask_token`` *before* the positional and
organ embeddings are added. The student thus knows that the organ was imaged and where each
patch sits, and must predict the teacher's features there from the other organs (the iBOT
loss covers these positions). A consequence we rely on: for the same batch the student's and
the teacher's token layouts are identical, so their tokens align position by position.

A batch may hold an organ's images at a smaller size than its grid where the caller allows it (a
local view's crops, ``model/views.py``): whole patches per axis. They are embedded at their own
patch grid with the positional embedding interpolated to it, as DINO embeds its smaller local
crops. Elsewhere (global views, evaluation) an image must be at its organ's grid: a loader that
produced the wrong size is an error, not a crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.config import OrganSpec
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.organs import OrganSet

INIT_STD = 0.02


@dataclass
class TokenSet:
    """A batch as padded token sequences.

    Args:
        tokens: (B, 1+T, D) embedded tokens, the CLS token first in each row.
        pad: (B, 1+T) bool, True at padding positions (after a subject's last token).
        organ_id: (B, 1+T) long, the organ id (vocabulary order) of each token; -1 for CLS
            and padding.
        masked: (B, 1+T) bool, True where the token was replaced by the mask token.
        positions: organ -> (n_o, P_o) long; token ``j`` of image ``i`` in
            ``batch.images[organ]`` sits at ``tokens[batch.index[organ][i], positions[organ][i, j]]``.
            Patches are numbered in row-major order of the organ's patch grid.
    """

    tokens: Tensor
    pad: Tensor
    organ_id: Tensor
    masked: Tensor
    positions: dict[str, Tensor]


def sequence_layout(present: Tensor, num_patches: Tensor) -> tuple[Tensor, int]:
    """Where each organ's tokens start in each subject's sequence.

    Args:
        present: (B, O) bool, subject b has organ k.
        num_patches: (O,) long, tokens per organ.

    Returns:
        offsets (B, O) long, the sequence position of organ k's first token in row b (only
        meaningful where present), and the padded sequence length 1 + T.
    """
    counts = present.long() * num_patches.to(present.device)[None]
    offsets = 1 + counts.cumsum(dim=1) - counts
    length = 1 + int(counts.sum(dim=1).max().item()) if present.numel() else 1
    return offsets, length


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def patch_embedding(x: Tensor, conv: nn.Conv2d | nn.Conv3d) -> Tensor:
    """``conv`` (kernel = stride = the patch, no padding) applied to (n, C, *S) as one matrix product.

    Returns (n, P, D), patches in row-major order of the patch grid: the same numbers as
    ``conv(x).flatten(2).transpose(1, 2)`` up to float rounding. Why not the convolution: a
    non-overlapping patch convolution is a GEMM over unfolded patches, and on CPU the GEMM with its
    backward took a fraction of oneDNN's strided convolution (docs/method.md).
    """
    patch = tuple(int(k) for k in conv.kernel_size)
    n, c, *size = x.shape
    grid = [s // p for s, p in zip(size, patch)]
    k = len(patch)
    # (n, C, g1, p1, g2, p2, ...) -> (n, g1, g2, ..., C, p1, p2, ...): the weight's (D, C, p1, ...) order.
    x = x.reshape(n, c, *[v for gp in zip(grid, patch) for v in gp])
    x = x.permute(0, *range(2, 2 + 2 * k, 2), 1, *range(3, 3 + 2 * k, 2))
    return nn.functional.linear(x.reshape(n, -1, c * math.prod(patch)), conv.weight.flatten(1), conv.bias)


class OrganTokenizer(nn.Module):
    """Patch embedding of one organ's grid plus its positional and organ embeddings.

    Args:
        spec: the organ's preprocessing spec (grid and patch size; 2 or 3 axes).
        dim: token width D.
    """

    def __init__(self, spec: OrganSpec, dim: int, stem_channels: int = 0) -> None:
        super().__init__()
        self.grid = tuple(spec.grid)
        self.patch = tuple(spec.patch)
        self.patch_grid = tuple(g // p for g, p in zip(spec.grid, spec.patch))
        self.num_patches = spec.num_patches
        conv = nn.Conv2d if len(spec.grid) == 2 else nn.Conv3d
        # Our choice (docs/method.md, "Convolutional stem"): two 3x3 convolutions before the patch
        # embedding give every token local, nonlinear detectors of texture, edges and small blobs.
        # A linear patch embedding must learn such statistics from pixels inside the transformer,
        # which an encoder of this size did not manage on a few thousand subjects (early
        # convolutions help ViTs, Xiao et al. 2021).
        self.stem: nn.Module | None = None
        if stem_channels > 0:
            self.stem = nn.Sequential(
                conv(1, stem_channels, 3, padding=1), nn.GELU(),
                conv(stem_channels, stem_channels, 3, padding=1), nn.GELU(),
            )
        in_ch = stem_channels if stem_channels > 0 else 1
        # (h, w) or (d, h, w), matching conv (Conv2d or Conv3d): one type for both arities.
        patch: Any = tuple(spec.patch)
        self.patch_embed = conv(in_ch, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.empty(self.num_patches, dim))
        self.organ_embed = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.organ_embed, std=INIT_STD)

    def fits(self, size: tuple[int, ...]) -> bool:
        """Whether images of spatial ``size`` can be embedded: the grid, or a crop of whole patches."""
        return len(size) == len(self.grid) and all(
            0 < s <= g and s % p == 0 for s, g, p in zip(size, self.grid, self.patch))

    def patches_of(self, size: tuple[int, ...]) -> int:
        """Tokens of one image of spatial ``size`` (one that :meth:`fits`)."""
        return math.prod(s // p for s, p in zip(size, self.patch))

    def position_embedding(self, size: tuple[int, ...]) -> Tensor:
        """(P, D) positional embeddings for images of spatial ``size``.

        The organ's own at its grid; for a crop, the grid's embeddings interpolated to the crop's
        patch grid (bicubic in 2D, trilinear in 3D: DINO's ``interpolate_pos_encoding`` rule), so
        a crop reads as the organ seen at a smaller size rather than as a part at a fixed place.
        """
        grid = tuple(s // p for s, p in zip(size, self.patch))
        if grid == self.patch_grid:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        pos = self.pos_embed.T.reshape(1, dim, *self.patch_grid)
        mode = "bicubic" if len(grid) == 2 else "trilinear"
        return F.interpolate(pos, size=grid, mode=mode, align_corners=False).reshape(dim, -1).T

    def patchify(self, images: Tensor) -> Tensor:
        """(n, 1, *size) images (the grid or a crop, :meth:`fits`) -> (n, P, D) patch embeddings (no position / organ added)."""
        x = images.to(self.patch_embed.weight.dtype)
        if self.stem is not None:
            # Channels-last: with 16 channels oneDNN's NCHW convolutions (and their backward) took
            # about twice as long on CPU, a quarter of a training step (docs/method.md).
            x = self.stem(x.contiguous(memory_format=_CHANNELS_LAST[x.dim()]))
        return patch_embedding(x, self.patch_embed)

    def forward(self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Embed ``images`` (n, 1, *size) into (n, P, D) tokens.

        Args:
            images: the organ's images at its grid, or crops of whole patches (:meth:`fits`).
            mask: optional (n, P) bool; True patches are replaced by ``mask_token``.
            mask_token: (D,) the replacement, required with ``mask``.
        """
        x = self.patchify(images)
        if mask is not None:
            if mask_token is None:
                raise ValueError("OrganTokenizer: a mask needs a mask_token")
            x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
        pos = self.position_embedding(tuple(images.shape[2:]))
        return x + pos.to(x.dtype) + self.organ_embed.to(x.dtype)


class PanOrganTokenizer(nn.Module):
    """Tokenizes a :class:`SubjectBatch` of subjects with different organ sets.

    Args:
        organs: the organ vocabulary (fixes organ ids and sequence order).
        specs: organ -> preprocessing spec; must cover every organ of ``organs``.
        dim: token width D.
    """

    def __init__(self, organs: OrganSet, specs: dict[str, OrganSpec], dim: int, stem_channels: int = 0) -> None:
        super().__init__()
        missing = [o for o in organs if o not in specs]
        if missing:
            raise ValueError(f"PanOrganTokenizer: no OrganSpec for organ(s) {', '.join(missing)}")
        self.organ_set = organs
        self.organs = nn.ModuleDict({o: OrganTokenizer(specs[o], dim, stem_channels) for o in organs})
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.mask_token = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        nn.init.trunc_normal_(self.mask_token, std=INIT_STD)

    def tokenizer(self, organ: str) -> OrganTokenizer:
        """The organ's own tokenizer (typed: ``ModuleDict`` items are plain modules to a type checker)."""
        return cast(OrganTokenizer, self.organs[organ])

    def _check(self, batch: SubjectBatch, organ_mask: Tensor | None, patch_mask: dict[str, Tensor] | None,
               crops: bool) -> None:
        names = self.organ_set.names
        if tuple(batch.organ_names) != names:
            raise ValueError(f"batch organ vocabulary {tuple(batch.organ_names)} differs from the model's {names}")
        B = batch.size
        if tuple(batch.present.shape) != (B, len(names)):
            raise ValueError(f"batch.present has shape {tuple(batch.present.shape)}, expected {(B, len(names))}")
        for o, x in batch.images.items():
            if o not in self.organs:
                raise ValueError(f"batch.images has unknown organ {o!r}; known: {', '.join(names)}")
            tok = self.tokenizer(o)
            size = tuple(x.shape[2:])
            if x.dim() != 2 + len(tok.grid) or x.shape[1] != 1 or not (size == tok.grid or crops and tok.fits(size)):
                also = f" or a crop of whole {'x'.join(map(str, tok.patch))} patches" if crops else ""
                raise ValueError(f"batch.images[{o!r}] has shape {tuple(x.shape)}, expected (n, 1, {', '.join(map(str, tok.grid))}){also}")
            idx = batch.index.get(o)
            if idx is None or idx.shape != (x.shape[0],):
                raise ValueError(f"batch.index[{o!r}] must be a ({x.shape[0]},) tensor of batch rows")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= B):
                raise ValueError(f"batch.index[{o!r}] has rows outside [0, {B})")
            k = names.index(o)
            rows = torch.zeros(B, dtype=torch.bool, device=idx.device)
            rows[idx] = True
            if not torch.equal(rows, batch.present[:, k].to(rows.device)) or len(idx.unique()) != len(idx):
                raise ValueError(f"batch.index[{o!r}] disagrees with batch.present[:, {k}] (each subject with the organ exactly once)")
        absent = [o for k, o in enumerate(names) if o not in batch.images and bool(batch.present[:, k].any())]
        if absent:
            raise ValueError(f"batch.present marks organ(s) {', '.join(absent)} but batch.images has none")
        if organ_mask is not None and (organ_mask.dtype != torch.bool or tuple(organ_mask.shape) != (B, len(names))):
            raise ValueError(f"organ_mask must be bool of shape {(B, len(names))}, got {organ_mask.dtype} {tuple(organ_mask.shape)}")
        for o, m in (patch_mask or {}).items():
            if o not in batch.images:
                raise ValueError(f"patch_mask[{o!r}]: organ not in this batch")
            want = (batch.images[o].shape[0], self.tokenizer(o).patches_of(tuple(batch.images[o].shape[2:])))
            if m.dtype != torch.bool or tuple(m.shape) != want:
                raise ValueError(f"patch_mask[{o!r}] must be bool of shape {want}, got {m.dtype} {tuple(m.shape)}")

    def forward(
        self,
        batch: SubjectBatch,
        organ_mask: Tensor | None = None,
        patch_mask: dict[str, Tensor] | None = None,
        crops: bool = False,
    ) -> TokenSet:
        """Embed and assemble the batch.

        Args:
            batch: the subjects; each organ's images only for the subjects holding it.
            organ_mask: optional (B, n_organs) bool, True = this organ is masked for this
                subject (all its patch tokens become the mask token).
            patch_mask: optional organ -> (n_o, P_o) bool, True = this patch is masked
                (rows follow ``batch.images[organ]``).
            crops: allow images smaller than their organ's grid (whole patches; local views).
        """
        self._check(batch, organ_mask, patch_mask, crops)
        B = batch.size
        dim = self.cls_token.shape[-1]
        device = self.cls_token.device
        present = batch.present.to(device)
        # Tokens per organ in this batch: its grid's, or fewer where the batch holds crops.
        counts = [self.tokenizer(o).patches_of(tuple(batch.images[o].shape[2:])) if o in batch.images else 0
                  for o in self.organ_set]
        offsets, length = sequence_layout(present, torch.tensor(counts, dtype=torch.long, device=device))

        # All tokens of the batch are gathered into one flat list and scattered into the padded
        # (B * length) buffer in one index_copy: no loop over subjects, differentiable.
        values = [self.cls_token.reshape(1, dim).expand(B, dim)]
        dest = [torch.arange(B, device=device) * length]
        ids = [torch.full((B,), -1, dtype=torch.long, device=device)]
        masks = [torch.zeros(B, dtype=torch.bool, device=device)]
        positions: dict[str, Tensor] = {}
        for k, o in enumerate(self.organ_set):
            if o not in batch.images:
                continue
            tok = self.tokenizer(o)
            rows = batch.index[o].to(device)
            n_patches = counts[k]
            mask = torch.zeros(rows.shape[0], n_patches, dtype=torch.bool, device=device)
            if organ_mask is not None:
                mask |= organ_mask.to(device)[rows, k][:, None]
            if patch_mask is not None and o in patch_mask:
                mask |= patch_mask[o].to(device)
            x = tok(batch.images[o].to(device), mask, self.mask_token)
            pos = offsets[rows, k][:, None] + torch.arange(n_patches, device=device)[None]
            positions[o] = pos
            values.append(x.reshape(-1, dim))
            dest.append((rows[:, None] * length + pos).reshape(-1))
            ids.append(torch.full((pos.numel(),), k, dtype=torch.long, device=device))
            masks.append(mask.reshape(-1))
        dest_t = torch.cat(dest)
        vals = torch.cat([v.to(values[-1].dtype) for v in values])
        tokens = vals.new_zeros(B * length, dim).index_copy(0, dest_t, vals).view(B, length, dim)
        organ_id = torch.full((B * length,), -1, dtype=torch.long, device=device).index_copy(0, dest_t, torch.cat(ids))
        masked = torch.zeros(B * length, dtype=torch.bool, device=device)
        masked[dest_t] = torch.cat(masks)
        filled = torch.zeros(B * length, dtype=torch.bool, device=device)
        filled[dest_t] = True
        return TokenSet(
            tokens=tokens,
            pad=~filled.view(B, length),
            organ_id=organ_id.view(B, length),
            masked=masked.view(B, length),
            positions=positions,
        )


def gather_organ_tokens(tokens: Tensor, batch: SubjectBatch, positions: dict[str, Tensor], organ: str) -> Tensor:
    """The (n_o, P_o, D) tokens of ``organ`` from a (B, 1+T, D) sequence tensor.

    Args:
        tokens: sequence tensor laid out as the :class:`TokenSet` that gave ``positions``.
        batch: the batch that was tokenized (its ``index`` gives the rows).
        positions: ``TokenSet.positions``.
        organ: the organ to read.
    """
    if organ not in positions:
        raise KeyError(f"organ {organ!r} has no tokens in this batch; present: {', '.join(positions)}")
    rows = batch.index[organ].to(tokens.device)
    return tokens[rows[:, None], positions[organ]]


__all__ = ["OrganTokenizer", "PanOrganTokenizer", "TokenSet", "gather_organ_tokens", "sequence_layout"]
