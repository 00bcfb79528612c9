"""Masked-patch pixel reconstruction (MAE-style), an optional loss beside DINO / iBOT.

Reference (MAE, He et al. 2022): predict the pixels of masked patches, each patch's target
normalised by its own mean and variance (``norm_pix_loss``), mean squared error over masked
patches only. Ours (docs/method.md): the decoder is one linear layer per organ on the student's
output tokens at the masked positions (the student already sees mask tokens in place, so no
separate decoder transformer is needed), and the target is the view the student was given
(the augmented global view), so reconstruction and self-distillation read the same pixels.
"""

from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch: tuple[int, ...]) -> Tensor:
    """(n, 1, *grid) -> (n, P, prod(patch)) pixels, patches in the row-major order of the patch grid
    (the order of the tokenizer's ``Conv`` output flattened)."""
    grid = tuple(images.shape[2:])
    if len(grid) != len(patch) or any(g % p for g, p in zip(grid, patch)):
        raise ValueError(f"patchify: patch {patch} must tile the grid {grid}")
    n, nd = images.shape[0], len(grid)
    shape = [n]
    for g, p in zip(grid, patch):
        shape += [g // p, p]
    x = images.reshape(shape)
    order = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    x = x.permute(order)
    n_patches = 1
    for g, p in zip(grid, patch):
        n_patches *= g // p
    return x.reshape(n, n_patches, -1)


def masked_patch_mse(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean over N masked patches of the squared error to the per-patch normalised pixels.

    Args:
        pred: (N, p) decoder output.
        target: (N, p) the patches' pixels (normalised here: zero mean, unit variance per patch).
        eps: variance floor (a flat patch has no contrast to predict).

    Returns 0 (attached to ``pred``) when N = 0.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"masked_patch_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, p)")
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    t = target.detach().float()
    t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return ((pred.float() - t) ** 2).mean()


__all__ = ["masked_patch_mse", "patchify"]
