"""PanFMSSL: the one meta-architecture that owns student, teacher, losses and the organ masker.

One training forward (DINOv2 layout, REFERENCES.md):
1. teacher (no grad, full view) -> CLS / token features and the last-layer CLS attention;
2. SGM: the attention shares update the masker's saliency estimate, the masker draws whole-organ
   masks and in-organ patch masks (no extra forward: the teacher's attention is reused);
3. student on the masked view (masked tokens replaced by the mask token, positions kept, so the
   student and teacher layouts are identical);
4. losses: DINO on CLS, iBOT on masked positions, DEX director -> expert distillation on the
   student's DEX layers, load balance on the student's routers; total = cfg.train.loss weights.
The teacher is kept in eval mode at all times: no router noise (a noisy target is a worse
target), no director distillation output and no usage accounting in the teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.losses.balance import load_balance_loss
from fedpanfm.losses.dex_distill import dex_distill_loss
from fedpanfm.losses.dino_cls import DINOClsLoss
from fedpanfm.losses.ibot_patch import IBOTPatchLoss
from fedpanfm.losses.koleo import koleo_loss
from fedpanfm.model.encoder import EncoderOutput, PanOrganEncoder
from fedpanfm.model.heads import DINOHead
from fedpanfm.sgm import OrganMasker, organ_attention_shares

SCHEDULE_KEYS = ("teacher_temp", "noise_std")


class SSLNetwork(nn.Module):
    """An encoder with its DINO head (shared by the CLS and the patch tokens, as in DINO/iBOT).

    Args:
        encoder: the pan-organ encoder.
        head: the projection head mapping D-wide tokens to K prototype logits.
    """

    def __init__(self, encoder: PanOrganEncoder, head: DINOHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, batch: SubjectBatch, organ_mask: Tensor | None = None, patch_mask: dict[str, Tensor] | None = None
    ) -> EncoderOutput:
        """The encoder's output for ``batch`` (masks as in :meth:`PanOrganEncoder.forward`)."""
        return self.encoder(batch, organ_mask, patch_mask)


@dataclass
class SSLStats:
    """Per-batch counts the trainer accumulates for the federation.

    Args:
        organ_subjects: (n_organs,) long, subjects of this batch holding each organ.
        gate_mass: (L, E) float, gate mass the student routed to each expert of each block
            (zero rows for blocks without DEX).
        saliency: (B, n_organs) float, the teacher's CLS-attention share per organ and subject.
    """

    organ_subjects: Tensor
    gate_mass: Tensor
    saliency: Tensor


@dataclass
class SSLOutput:
    """One forward: the total loss (with graph), scalar metrics, and :class:`SSLStats`."""

    loss: Tensor
    metrics: dict[str, float]
    stats: SSLStats


class PanFMSSL(nn.Module):
    """Student, EMA teacher, DINO / iBOT losses (with their centres) and the SGM organ masker.

    Args:
        cfg: the experiment config (``model``, ``data.organs``, ``train`` for temperatures,
            masking and loss weights).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        m, t = cfg.model, cfg.train
        self.student = SSLNetwork(
            PanOrganEncoder(cfg), DINOHead(m.dim, m.head_hidden_dim, m.head_bottleneck_dim, m.head_out_dim)
        )
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        s_names = [n for n, _ in self.student.named_parameters()]
        t_names = [n for n, _ in self.teacher.named_parameters()]
        if s_names != t_names:  # update_teacher pairs parameters by position
            raise RuntimeError("PanFMSSL: student and teacher parameter lists differ")
        self.dino_loss = DINOClsLoss(m.head_out_dim, t.student_temp, t.center_momentum)
        self.ibot_loss = IBOTPatchLoss(m.head_out_dim, t.student_temp, t.center_momentum)
        self.organs = cfg.data.organ_set()
        self.masker = OrganMasker(self.organs, t.masking)
        self.num_patches = {o: cfg.data.organs[o].num_patches for o in self.organs}
        self._ema_params: tuple[list[Tensor], list[Tensor]] | None = None

    def train(self, mode: bool = True) -> "PanFMSSL":
        """Switch the student, losses and masker; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------ forward

    def forward(
        self, batch: SubjectBatch, sched: dict[str, float], generator: torch.Generator | None = None
    ) -> SSLOutput:
        """One self-distillation step's losses.

        Args:
            batch: the subjects (on the model's device).
            sched: this step's schedule values; needs ``teacher_temp`` and ``noise_std``
                (``Schedules.at(step)``).
            generator: CPU generator for the masks (None: the global RNG).

        In training mode the teacher centres and the masker's saliency estimate are updated;
        in eval mode no state changes (masks are still drawn, so the loss is comparable).
        """
        missing = [k for k in SCHEDULE_KEYS if k not in sched]
        if missing:
            raise KeyError(f"PanFMSSL.forward: sched lacks {', '.join(missing)} (have: {', '.join(sorted(sched))})")
        teacher_temp = float(sched["teacher_temp"])
        for layer in self.student.encoder.dex_layers():
            layer.noise_std = float(sched["noise_std"])

        with torch.no_grad():
            t_out = self.teacher(batch)
        shares = organ_attention_shares(t_out.cls_attn, t_out.organ_id, len(self.organs))
        present = batch.present.to(shares.device)
        if self.training:
            self.masker.update(shares, present)
        organ_mask = self.masker.sample(present, generator)
        patch_mask = self.masker.sample_patch_mask(batch, organ_mask, self.num_patches, generator)

        s_out = self.student(batch, organ_mask, patch_mask)
        if not (torch.equal(s_out.pad, t_out.pad) and torch.equal(s_out.organ_id, t_out.organ_id)):
            raise RuntimeError("PanFMSSL: student and teacher token layouts differ for the same batch")
        sel = s_out.masked & ~s_out.pad
        rows = sel.nonzero()[:, 0]
        n_cls = s_out.cls.shape[0]
        # One head call for the CLS tokens and the masked tokens (the head is shared).
        s_logits = self.student.head(torch.cat([s_out.cls, s_out.tokens[sel]]))
        with torch.no_grad():
            t_logits = self.teacher.head(torch.cat([t_out.cls, t_out.tokens[sel]]))

        loss_dino = self.dino_loss(s_logits[:n_cls], t_logits[:n_cls], teacher_temp)
        loss_ibot = self.ibot_loss(s_logits[n_cls:], t_logits[n_cls:], rows, teacher_temp)
        if self.training:
            self.dino_loss.update_center(t_logits[:n_cls])
            self.ibot_loss.update_center(t_logits[n_cls:])
        loss_dex = dex_distill_loss(s_out.dex, self.cfg.model.dex.distill_temperature)
        loss_bal = load_balance_loss(s_out.dex)

        w = self.cfg.train.loss
        total = w.dino * loss_dino + w.ibot * loss_ibot
        metrics = {"loss/dino": loss_dino.item(), "loss/ibot": loss_ibot.item()}
        if loss_dex is not None:
            total = total + w.dex * loss_dex
            metrics["loss/dex"] = loss_dex.item()
        if loss_bal is not None:
            total = total + w.balance * loss_bal
            metrics["loss/balance"] = loss_bal.item()
        if w.koleo > 0:
            loss_koleo = koleo_loss(s_out.cls)
            if loss_koleo is not None:
                total = total + w.koleo * loss_koleo
                metrics["loss/koleo"] = loss_koleo.item()
        metrics["loss"] = total.item()
        n_present = int(present.sum())
        metrics["mask/organ_ratio"] = float(organ_mask.sum()) / max(n_present, 1)
        organ_tokens = int((s_out.organ_id >= 0).sum())
        metrics["mask/token_ratio"] = float(sel.sum()) / max(organ_tokens, 1)

        stats = SSLStats(
            organ_subjects=present.sum(dim=0).long(),
            gate_mass=self._gate_mass(s_out),
            saliency=shares,
        )
        return SSLOutput(loss=total, metrics=metrics, stats=stats)

    def _gate_mass(self, out: EncoderOutput) -> Tensor:
        n_experts = self.cfg.model.dex.experts
        rows = [
            a.gate_mass().float() if a is not None else torch.zeros(n_experts, device=out.cls.device)
            for a in out.dex
        ]
        return torch.stack(rows)

    # ------------------------------------------------------------------ updates

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, parameter by parameter (directors included).

        Args:
            momentum: m in [0, 1] (cosine 0.996 -> 1.0 in the trainer).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"update_teacher: momentum {momentum} outside [0, 1]")
        if self._ema_params is None:
            # Parameter objects are never replaced (state loads copy in place, .to() swaps their
            # data), so the pairing is built once: walking both module trees cost as much as the
            # EMA itself per step. Held as Parameters (not detached views) so a device move
            # cannot leave the cache pointing at old storage; no_grad covers the in-place op.
            self._ema_params = (list(self.teacher.parameters()), list(self.student.parameters()))
        t_params, s_params = self._ema_params
        # One pass over teacher and student (lerp) instead of a mul_ pass and an add_ pass.
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    @torch.no_grad()
    def update_directors(self, momentum: float) -> list[Tensor]:
        """Group-EMA step of every student DEX director; the teacher's follow via :meth:`update_teacher`.

        Args:
            momentum: group-EMA momentum (cosine 0.99 -> 0.999 in the trainer).

        Returns the (E,) expert weights each layer used, block order.
        """
        return [layer.group_ema_update(momentum) for layer in self.student.encoder.dex_layers()]

    def encoder_for_eval(self) -> PanOrganEncoder:
        """The teacher encoder: by the DINO convention the EMA teacher is the better encoder."""
        return self.teacher.encoder


__all__ = ["PanFMSSL", "SSLNetwork", "SSLOutput", "SSLStats"]
