"""KoLeo regulariser: spread the student's CLS embeddings over the sphere within a batch.

Reference (REFERENCES.md, DINOv2): DINOv2 keeps a KoLeo term beside its DINO and iBOT losses.
It is the Kozachenko-Leonenko differential-entropy estimator, ``-mean_i log(min_{j != i} ||x_i -
x_j||)`` over L2-normalised features: pushing nearest neighbours apart keeps the representation
from collapsing onto a few directions. Why we need it (docs/method.md): on our small cohorts,
self-distillation without it collapsed the teacher's CLS onto a single direction (body size, a
nuisance factor), participation ratio 1.2, and the disease factors became undecodable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor | None:
    """The KoLeo entropy estimate's negative for one batch of embeddings.

    Args:
        features: (B, D) embeddings (e.g. the student's CLS tokens); normalised here.
        eps: floor of the nearest-neighbour distance (duplicates would give log 0).

    Returns:
        A scalar, or None when the batch has fewer than two rows (no neighbour to push from).
    """
    if features.shape[0] < 2:
        return None
    x = F.normalize(features.float(), dim=-1, eps=eps)
    # The nearest neighbour by cosine similarity is the nearest in Euclidean distance on the sphere.
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(dim=1)
    dist = (x - x[nearest]).norm(dim=-1)
    return -torch.log(dist + eps).mean()


__all__ = ["koleo_loss"]
