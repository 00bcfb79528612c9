"""iBOT patch loss: the DINO cross-entropy on masked token positions, with its own centre.

References (REFERENCES.md): iBOT applies the centred, sharpened teacher cross-entropy to masked
patch tokens. Our reconstruction: the loss is averaged over each subject's masked tokens first and
then over subjects, so a subject with many masked tokens (large organs, or a masked adipose with
64 patches) does not dominate the batch loss; the centre is the mean teacher output over the
masked positions (the only positions the teacher head is evaluated on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedpanfm.global_batch import mean_denominator, sharing
from fedpanfm.losses.dino_cls import CenteredDistillLoss


class IBOTPatchLoss(CenteredDistillLoss):
    """Masked-token self-distillation loss.

    Args:
        out_dim: number of patch prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum of this loss's own teacher centre.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        subject_index: Tensor,
        teacher_temp: float,
    ) -> Tensor:
        """Scalar loss over N masked positions.

        Args:
            student_logits: (N, K) student head outputs at the masked positions.
            teacher_logits: (N, K) teacher head outputs at the same positions (full view).
            subject_index: (N,) long, the batch row each position belongs to.
            teacher_temp: the teacher temperature at this step.

        Returns 0 (still attached to the student graph) when nothing is masked.
        """
        if subject_index.dim() != 1 or subject_index.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"IBOTPatchLoss: subject_index {tuple(subject_index.shape)} must be (N,) with "
                f"N = {student_logits.shape[0]} masked positions"
            )
        if student_logits.shape[0] == 0 and sharing() is None:
            return student_logits.sum() * 0.0
        # Ranks sharing a global batch all take part in Sinkhorn-Knopp's and the mean's
        # reductions, a rank without masked tokens too.
        per_token = self.row_losses(student_logits, teacher_logits, teacher_temp)
        n_rows = int(subject_index.max()) + 1 if subject_index.numel() else 0
        sums = torch.zeros(n_rows, device=per_token.device, dtype=per_token.dtype).index_add(0, subject_index, per_token)
        counts = torch.zeros(n_rows, device=per_token.device, dtype=per_token.dtype).index_add(
            0, subject_index, torch.ones_like(per_token)
        )
        has = counts > 0
        # The mean over rows with masked tokens is over the global batch's such rows.
        denominator = mean_denominator(has.sum())
        if not bool(has.any()):
            return student_logits.sum() * 0.0
        return (sums[has] / counts[has]).sum() / denominator
