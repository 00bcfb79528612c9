"""PanFMSSL: the one meta-architecture that owns student, teacher, losses and the organ masker.

One training forward (DINO multi-crop + iBOT + DINOv2 layout, REFERENCES.md; docs/method.md):
1. views (``model/views.py``): two augmented GLOBAL views of every subject (all its organs) and
   ``train.local_views`` LOCAL views (organ subsets, each organ a crop at ``train.local_crop`` < 1,
   independently augmented);
2. teacher (no grad, eval mode) on the two global views, unmasked -> CLS / token features and
   the last-layer CLS attention;
3. SGM: the attention shares update the masker's saliency estimate, the masker draws whole-organ
   masks and in-organ patch masks for the student's global views (no extra forward);
4. student on the masked global views (masked tokens replaced by the mask token, positions kept,
   so the student's and the teacher's layouts of a view are identical) and on the local views;
5. losses: DINO across views (teacher global view g -> every student view v != g), iBOT within
   each global view (teacher tokens of view v at the positions masked in the student's view v),
   DEX director -> expert distillation and load balance on the student's DEX layers, optional
   KoLeo, MAE-style reconstruction and organ contrast (ours: each organ of a local view against
   every organ of the student's global views); total = cfg.train.loss weights.
The teacher is kept in eval mode at all times: no router noise (a noisy target is a worse
target), no director distillation output and no usage accounting in the teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.augment import OrganAugmenter
from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.losses.balance import load_balance_loss
from fedpanfm.losses.dex_distill import dex_distill_loss
from fedpanfm.losses.dino_cls import DINOClsLoss
from fedpanfm.losses.ibot_patch import IBOTPatchLoss
from fedpanfm.losses.koleo import koleo_loss
from fedpanfm.losses.mae import masked_patch_mse, patchify
from fedpanfm.losses.organ_contrast import organ_contrast_loss
from fedpanfm.model.dex import MLP
from fedpanfm.model.encoder import EncoderOutput, PanOrganEncoder, organ_token_means
from fedpanfm.model.heads import DINOHead
from fedpanfm.model.tokenizer import gather_organ_tokens
from fedpanfm.model.views import crop_size, make_views
from fedpanfm.sgm import OrganMasker, organ_attention_shares

SCHEDULE_KEYS = ("teacher_temp", "noise_std")
#: Global views per subject: DINO's two, each teacher view supervising the other.
GLOBAL_VIEWS = 2


class SSLNetwork(nn.Module):
    """An encoder with its DINO head (shared by the CLS and the patch tokens, as in DINO/iBOT).

    Args:
        encoder: the pan-organ encoder.
        head: the projection head mapping D-wide tokens to K prototype logits.
        pixel_decoder: organ -> linear patch decoder (MAE-style loss only).
        organ_projector: organ mean token -> contrastive embedding (organ contrast only).
    """

    def __init__(self, encoder: PanOrganEncoder, head: DINOHead, pixel_decoder: nn.ModuleDict | None = None,
                 organ_projector: MLP | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        # Each only when its loss is on: the default state keys stay those of earlier runs.
        if pixel_decoder is not None:
            self.pixel_decoder = pixel_decoder
        if organ_projector is not None:
            self.organ_projector = organ_projector

    def forward(
        self, batch: SubjectBatch, organ_mask: Tensor | None = None, patch_mask: dict[str, Tensor] | None = None,
        crops: bool = False,
    ) -> EncoderOutput:
        """The encoder's output for ``batch`` (masks and crops as in :meth:`PanOrganEncoder.forward`)."""
        return self.encoder(batch, organ_mask, patch_mask, crops)


@dataclass
class SSLStats:
    """Per-batch counts the trainer accumulates for the federation.

    Args:
        organ_subjects: (n_organs,) long, subjects of this batch holding each organ.
        gate_mass: (L, E) float, gate mass the student routed to each expert of each block
            (zero rows for blocks without DEX).
        saliency: (B, n_organs) float, the teacher's CLS-attention share per organ and subject
            (mean over the global views).
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
        pixel_decoder = None
        if t.loss.mae > 0:
            pixel_decoder = nn.ModuleDict({
                o: nn.Linear(m.dim, math.prod(cfg.data.organs[o].patch)) for o in cfg.data.organ_set()
            })
        projector = MLP(m.dim, m.organ_proj_hidden_dim, m.organ_proj_dim) if t.loss.organ_contrast > 0 else None
        self.student = SSLNetwork(
            PanOrganEncoder(cfg), DINOHead(m.dim, m.head_hidden_dim, m.head_bottleneck_dim, m.head_out_dim),
            pixel_decoder, projector,
        )
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        s_names = [n for n, _ in self.student.named_parameters()]
        t_names = [n for n, _ in self.teacher.named_parameters()]
        if s_names != t_names:  # update_teacher pairs parameters by position
            raise RuntimeError("PanFMSSL: student and teacher parameter lists differ")
        self.dino_loss = DINOClsLoss(m.head_out_dim, t.student_temp, t.center_momentum, t.centering)
        self.ibot_loss = IBOTPatchLoss(m.head_out_dim, t.student_temp, t.center_momentum, t.centering)
        self.organs = cfg.data.organ_set()
        self.masker = OrganMasker(self.organs, t.masking)
        self.num_patches = {o: cfg.data.organs[o].num_patches for o in self.organs}
        self.crop_sizes = None if t.local_crop >= 1.0 else {
            o: crop_size(tuple(cfg.data.organs[o].grid), tuple(cfg.data.organs[o].patch), t.local_crop) for o in self.organs
        }
        self.augmenter = OrganAugmenter(t.augment)
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
            generator: CPU generator for the views (organ subsets, augmentations) and the masks
                (None: inside a training micro-step, draws keyed by each row's place in the site's
                global batch, fedpanfm/global_batch.py; elsewhere the global RNG).

        In training mode the teacher centres and the masker's saliency estimate are updated;
        in eval mode no state changes (masks are still drawn, so the loss is comparable).
        """
        missing = [k for k in SCHEDULE_KEYS if k not in sched]
        if missing:
            raise KeyError(f"PanFMSSL.forward: sched lacks {', '.join(missing)} (have: {', '.join(sorted(sched))})")
        teacher_temp = float(sched["teacher_temp"])
        for layer in self.student.encoder.dex_layers():
            layer.noise_std = float(sched["noise_std"])
        t = self.cfg.train
        views = make_views(batch, GLOBAL_VIEWS, t.local_views, (t.local_keep_ratio[0], t.local_keep_ratio[1]),
                           self.augmenter, generator, self.crop_sizes)
        gv, B = views.global_views, batch.size

        with torch.no_grad():
            t_out = self.teacher(gv)
        shares = organ_attention_shares(t_out.cls_attn, t_out.organ_id, len(self.organs))
        present = gv.present.to(shares.device)
        if self.training:
            self.masker.update(shares, present)
        # SGM masks the student's global views; the local views are organ subsets already.
        organ_mask = self.masker.sample(present, generator)
        patch_mask = self.masker.sample_patch_mask(gv, organ_mask, self.num_patches, generator)

        s_out = self.student(gv, organ_mask, patch_mask)
        if not (torch.equal(s_out.pad, t_out.pad) and torch.equal(s_out.organ_id, t_out.organ_id)):
            raise RuntimeError("PanFMSSL: student and teacher token layouts differ for the same view")
        s_local = None
        if views.local_views is not None:
            s_local = self.student(views.local_views, crops=self.crop_sizes is not None)
        sel = s_out.masked & ~s_out.pad
        rows = sel.nonzero()[:, 0]  # the (view, subject) row: iBOT averages per row first
        s_cls = [s_out.cls] + ([s_local.cls] if s_local is not None else [])
        n_s, n_t = views.n_views * B, GLOBAL_VIEWS * B
        # One head call per network for the CLS tokens and the masked tokens (the head is shared).
        s_logits = self.student.head(torch.cat(s_cls + [s_out.tokens[sel]]))
        with torch.no_grad():
            t_logits = self.teacher.head(torch.cat([t_out.cls, t_out.tokens[sel]]))
        k = s_logits.shape[-1]
        loss_dino = self.dino_loss.cross_view(
            s_logits[:n_s].view(views.n_views, B, k), t_logits[:n_t].view(GLOBAL_VIEWS, B, k), teacher_temp
        )
        loss_ibot = self.ibot_loss(s_logits[n_s:], t_logits[n_t:], rows, teacher_temp)
        if self.training:
            self.dino_loss.update_center(t_logits[:n_t])
            self.ibot_loss.update_center(t_logits[n_t:])
        outs = [(s_out, GLOBAL_VIEWS)] + ([(s_local, views.n_local)] if s_local is not None else [])
        loss_dex = self._view_mean([(dex_distill_loss(o.dex, self.cfg.model.dex.distill_temperature), n) for o, n in outs])
        loss_bal = self._view_mean([(load_balance_loss(o.dex), n) for o, n in outs])

        w = t.loss
        total = w.dino * loss_dino + w.ibot * loss_ibot
        metrics = {"loss/dino": loss_dino.item(), "loss/ibot": loss_ibot.item()}
        if loss_dex is not None:
            total = total + w.dex * loss_dex
            metrics["loss/dex"] = loss_dex.item()
        if loss_bal is not None:
            total = total + w.balance * loss_bal
            metrics["loss/balance"] = loss_bal.item()
        if w.koleo > 0:
            # DINOv2 spreads each global view's student CLS within the batch.
            terms = [koleo_loss(c) for c in s_out.cls.view(GLOBAL_VIEWS, B, -1)]
            kept = [x for x in terms if x is not None]
            if len(kept) == len(terms):
                loss_koleo = torch.stack(kept).mean()
                total = total + w.koleo * loss_koleo
                metrics["loss/koleo"] = loss_koleo.item()
        if w.mae > 0:
            loss_mae = self._mae_loss(gv, s_out, patch_mask)
            total = total + w.mae * loss_mae
            metrics["loss/mae"] = loss_mae.item()
        if w.organ_contrast > 0 and s_local is not None and views.local_views is not None:
            loss_con = self._organ_contrast(gv, s_out, views.local_views, s_local, B)
            total = total + w.organ_contrast * loss_con
            metrics["loss/organ_contrast"] = loss_con.item()
        metrics["loss"] = total.item()
        n_present = int(present.sum())
        metrics["mask/organ_ratio"] = float(organ_mask.sum()) / max(n_present, 1)
        organ_tokens = int((s_out.organ_id >= 0).sum())
        metrics["mask/token_ratio"] = float(sel.sum()) / max(organ_tokens, 1)
        if views.local_views is not None:
            metrics["views/local_organ_ratio"] = float(views.local_views.present.sum()) / max(n_present // GLOBAL_VIEWS, 1) / views.n_local

        stats = SSLStats(
            organ_subjects=batch.present.sum(dim=0).long().to(shares.device),
            gate_mass=torch.stack([self._gate_mass(o) for o, _ in outs]).sum(dim=0) / views.n_views,
            saliency=shares.view(GLOBAL_VIEWS, B, -1).mean(dim=0),
        )
        return SSLOutput(loss=total, metrics=metrics, stats=stats)

    @staticmethod
    def _view_mean(terms: list[tuple[Tensor | None, int]]) -> Tensor | None:
        """Mean of per-forward losses weighted by the views each forward holds (None: no DEX)."""
        kept = [(x, n) for x, n in terms if x is not None]
        if not kept:
            return None
        return torch.stack([x * n for x, n in kept]).sum() / sum(n for _, n in kept)

    def _mae_loss(self, views: SubjectBatch, out: EncoderOutput, patch_mask: dict[str, Tensor]) -> Tensor:
        """Pixel reconstruction of every masked patch of the student's global views."""
        preds, targets = [], []
        for organ, mask in patch_mask.items():
            tokens = gather_organ_tokens(out.tokens, views, out.positions, organ)[mask]
            preds.append(self.student.pixel_decoder[organ](tokens))
            pixels = patchify(views.images[organ], tuple(self.cfg.data.organs[organ].patch))
            targets.append(pixels[mask.to(pixels.device)])
        # Organs differ in patch size: one mean over all masked patches, organ by organ.
        n = sum(p.shape[0] for p in preds)
        if n == 0:
            return out.cls.sum() * 0.0
        return sum(masked_patch_mse(p, t) * p.shape[0] for p, t in zip(preds, targets)) / n

    def _organ_contrast(self, gv: SubjectBatch, g_out: EncoderOutput, lv: SubjectBatch, l_out: EncoderOutput,
                        n_subjects: int) -> Tensor:
        """InfoNCE from each organ of each local view to the same organ of the student's global views.

        The key of (subject, organ) is the mean over the global views of the organ's mean output
        token, over the views where the masker left at least one of its tokens visible (a wholly
        masked organ's outputs are predictions, not an encoding); queries without a key are left out.
        """
        n_organs, dim = len(self.organs), g_out.tokens.shape[-1]
        g_means = organ_token_means(g_out.tokens, g_out.organ_id, g_out.pad, n_organs).view(-1, n_subjects, n_organs, dim)
        visible = (g_out.organ_id >= 0) & ~g_out.pad & ~g_out.masked
        seen = F.one_hot(g_out.organ_id.clamp(min=0), n_organs).mul(visible[..., None]).sum(1) > 0
        seen = (seen & gv.present.to(seen.device).bool()).view(-1, n_subjects, n_organs)
        n_seen = seen.sum(0)
        has_key = n_seen > 0  # (B, O)
        key_means = (g_means * seen[..., None]).sum(0) / n_seen.clamp(min=1)[..., None]
        key_index = torch.full(has_key.shape, -1, dtype=torch.long, device=has_key.device)
        key_index[has_key] = torch.arange(int(has_key.sum()), device=has_key.device)

        l_means = organ_token_means(l_out.tokens, l_out.organ_id, l_out.pad, n_organs)
        l_present = lv.present.to(l_means.device).bool()
        n_local = l_means.shape[0] // n_subjects
        subject = torch.arange(n_local * n_subjects, device=l_means.device).remainder(n_subjects)
        positive = key_index[subject[:, None].expand_as(l_present), torch.arange(n_organs, device=l_means.device)]
        take = l_present & (positive >= 0)
        projector = self.student.organ_projector
        return organ_contrast_loss(projector(l_means[take]), projector(key_means[has_key]), positive[take],
                                   self.cfg.train.organ_contrast_temp)

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
