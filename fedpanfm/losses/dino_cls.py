"""DINO CLS loss: cross-entropy from the centred, sharpened teacher to the student prototypes.

References (REFERENCES.md, "Self-distillation essentials"): teacher output centred by a running
centre (momentum ``center_momentum``) and sharpened by a teacher temperature; student temperature
0.1. The centre is a buffer, so it travels with the model's state dict. DINOv2 replaces the centre
by Sinkhorn-Knopp normalisation of the teacher's batch (``centering="sinkhorn_knopp"``): the
targets are pushed to use every prototype equally over the batch (no collapse onto a few
prototypes). It does not sharpen rows that barely differ: measured on the study's tiny encoder
(docs/results.md), it left the DINO loss at log K just as the running centre did.

On a site training on several devices both are statistics of the site's global batch, as in
DINOv2 (whose ``SinkhornKnopp`` all-reduces its sums): the prototype sums of Sinkhorn-Knopp and
the batch mean of the centre are reduced over the ranks (``fedpanfm/global_batch.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.global_batch import all_logsumexp, all_sum, sharing


class CenteredDistillLoss(nn.Module):
    """Shared core of the DINO and iBOT losses: a teacher centre and a per-row cross-entropy.

    Args:
        out_dim: number of prototypes K (the head's output size).
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the teacher centre (0.9 in DINO).
        centering: ``"centre"`` (DINO's running centre) or ``"sinkhorn_knopp"`` (DINOv2).
    """

    #: Sinkhorn-Knopp iterations (DINOv2's ``sinkhorn_knopp_teacher`` default).
    SK_ITERATIONS = 3
    center: Tensor

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float, centering: str = "centre") -> None:
        super().__init__()
        if out_dim < 1 or student_temp <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: need out_dim >= 1, student_temp > 0, 0 <= center_momentum <= 1; "
                f"got {out_dim}, {student_temp}, {center_momentum}"
            )
        if centering not in ("centre", "sinkhorn_knopp"):
            raise ValueError(f"{type(self).__name__}: centering must be 'centre' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets (..., K) from teacher logits: centred softmax, or Sinkhorn-Knopp over all rows."""
        t = teacher_logits.detach().float()
        if self.centering == "centre":
            return F.softmax((t - self.center) / teacher_temp, dim=-1)
        flat = t.reshape(-1, t.shape[-1])
        # Log-domain iterations: exp(logits / 0.04) overflows fp32 for |logits| > ~3.5.
        log_q = flat / teacher_temp
        n, k = flat.shape
        if sharing() is not None:
            # N and the prototype sums over every rank's rows; the row sums are each row's own.
            n = int(all_sum(torch.tensor([float(n)], device=flat.device)).item())
        log_n = math.log(max(n, 1))
        for _ in range(self.SK_ITERATIONS):
            log_q = log_q - all_logsumexp(log_q, dim=0) - math.log(k)  # each prototype 1/K
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each row 1/N
        return (log_q + log_n).exp().reshape(t.shape)

    def _check(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> None:
        k = self.center.shape[1]
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2 or student_logits.shape[1] != k:
            raise ValueError(
                f"{type(self).__name__}: student {tuple(student_logits.shape)} and teacher "
                f"{tuple(teacher_logits.shape)} logits must both be (N, {k})"
            )
        if teacher_temp <= 0:
            raise ValueError(f"{type(self).__name__}: teacher_temp must be > 0, got {teacher_temp}")

    def row_losses(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Per-row loss -sum_k softmax((t - c)/T_t)_k * log_softmax(s/T_s)_k, shape (N,).

        Args:
            student_logits: (N, K) student head outputs.
            teacher_logits: (N, K) teacher head outputs (detached here: no gradient to the teacher).
            teacher_temp: the teacher temperature at this step (schedules.py warms it up).
        """
        self._check(student_logits, teacher_logits, teacher_temp)
        # Targets in fp32: bf16 logits / 0.04 overflow the softmax's useful range.
        t = self.teacher_probs(teacher_logits, teacher_temp)
        log_s = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(t * log_s).sum(dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the batch mean of the teacher logits (N, K) into ``center``; no-op when N = 0.

        Ranks sharing a global batch take its mean (every rank computes the same new centre).
        """
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.update_center: teacher logits {tuple(teacher_logits.shape)} "
                f"must be (N, {self.center.shape[1]})"
            )
        logits = teacher_logits.detach().float()
        if sharing() is not None:
            total = all_sum(torch.cat([logits.sum(dim=0), logits.new_tensor([logits.shape[0]])]))
            if total[-1] == 0:
                return
            batch_center = (total[:-1] / total[-1]).unsqueeze(0)
        elif logits.shape[0] == 0:
            return
        else:
            batch_center = logits.mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINOClsLoss(CenteredDistillLoss):
    """DINO loss on the CLS token: mean over subjects of the per-subject cross-entropy.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature (0.1 in DINO).
        center_momentum: EMA momentum of the teacher centre (0.9 in DINO).
    """

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Scalar loss from (B, K) student and teacher CLS logits at ``teacher_temp``."""
        if student_logits.shape[0] == 0:
            raise ValueError("DINOClsLoss: empty batch (0 subjects)")
        return self.row_losses(student_logits, teacher_logits, teacher_temp).mean()

    def cross_view(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """DINO's multi-crop loss: every teacher view supervises every OTHER student view.

        Args:
            student_logits: (V, B, K), the student's CLS logits of V views; views 0..G-1 are the
                global views the teacher saw, the rest local views.
            teacher_logits: (G, B, K), the teacher's CLS logits of the G global views.
            teacher_temp: the teacher temperature at this step.

        Returns the mean over the G * V - G pairs (g, v), v != g, of the subject-mean
        cross-entropy from teacher view g to student view v (facebookresearch/dino ``DINOLoss``).
        """
        if student_logits.dim() != 3 or teacher_logits.dim() != 3:
            raise ValueError(
                f"DINOClsLoss.cross_view: student {tuple(student_logits.shape)} and teacher "
                f"{tuple(teacher_logits.shape)} logits must be (V, B, K) and (G, B, K)"
            )
        n_views, n_global = student_logits.shape[0], teacher_logits.shape[0]
        if n_global > n_views or n_views < 2 or student_logits.shape[1:] != teacher_logits.shape[1:]:
            raise ValueError(
                f"DINOClsLoss.cross_view: need 2 <= G <= V views over the same (B, K); got student "
                f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
            )
        self._check(student_logits[0], teacher_logits[0], teacher_temp)
        if student_logits.shape[1] == 0:
            raise ValueError("DINOClsLoss.cross_view: empty batch (0 subjects)")
        t = self.teacher_probs(teacher_logits, teacher_temp)
        log_s = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        # (G, V): subject-mean cross-entropy of each (teacher view, student view) pair.
        pair = -torch.einsum("gbk,vbk->gv", t, log_s) / student_logits.shape[1]
        other = ~torch.eye(n_global, n_views, dtype=torch.bool, device=pair.device)
        return pair[other].mean()
