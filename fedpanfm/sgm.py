"""Saliency-Guided Masking (SGM): the teacher's own attention decides which whole organs to mask.

From the references (Pan-FM abstract, REFERENCES.md): the model's attention distribution over
organs decides which organs to mask, dominant organs (adipose, heart) are masked more often, at
negligible cost. The exact rule below is OUR reconstruction (docs/method.md, "SGM"):

1. Saliency of organ o in subject b: the share a_{b,o} of the teacher's last-layer CLS attention
   that falls on o's tokens (summed over its tokens, NOT divided by its token count: the CLS's
   reliance on an organ is the total mass it draws from it, and the large organs' token count is
   part of the shortcut). It is made relative to the subject's organ count,
   r_{b,o} = |P_b| * a_{b,o} (1 = an average organ of that subject), so organs imaged mostly in
   subjects with few organs are not inflated (organs are missing not at random).
2. A running per-organ estimate s_o: EMA (momentum ``saliency_momentum``) of the batch mean of
   r_{b,o} over the subjects that have o; the first observation sets it. A federation-wide
   estimate g_o blends in: s'_o = w g_o + (1 - w) s_o (g_o alone where the site never saw o).
3. Per subject with present organs P_b: q_o = softmax_{o in P_b}(log s'_o / temperature), and
   p_o = min(1, c_b q_o) with c_b chosen (water-filling) so that sum_o p_o = organ_mask_ratio * |P_b|.
   The ``random`` policy uses p_o = organ_mask_ratio for every present organ: the same expected
   number of masked organs, so it is the fair ablation of *which* organs are masked.
4. Each present organ is masked independently with p_o. A subject never loses all its organs: if
   every organ was drawn, the least salient one is unmasked under ``sgm`` (the one the model uses
   least is the one it should keep seeing), a uniformly drawn one under ``random``.

On a site training on several devices, the batch mean of step 2 is over the site's global batch
(summed over the ranks, ``fedpanfm/global_batch.py``), and the masks' random numbers are keyed
by each view's place in it, so the ranks mask as one device would.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedpanfm.config import MaskingConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.global_batch import all_sum, draws_for
from fedpanfm.organs import OrganSet


def organ_attention_shares(cls_attn: Tensor, organ_id: Tensor, n_organs: int) -> Tensor:
    """Per subject, the share of CLS attention on each organ's tokens, (B, n_organs).

    Args:
        cls_attn: (B, 1+T) CLS attention over the tokens (``EncoderOutput.cls_attn``).
        organ_id: (B, 1+T) long organ id of each token, -1 at CLS and padding.
        n_organs: size of the organ vocabulary.

    Rows sum to 1 over the organs present (CLS self-attention excluded); a row without organ
    tokens is all zero.
    """
    if cls_attn.shape != organ_id.shape or cls_attn.dim() != 2:
        raise ValueError(f"organ_attention_shares: cls_attn {tuple(cls_attn.shape)} and organ_id {tuple(organ_id.shape)} must both be (B, 1+T)")
    if int(organ_id.max()) >= n_organs:
        raise ValueError(f"organ_attention_shares: organ id {int(organ_id.max())} outside the {n_organs}-organ vocabulary")
    valid = organ_id >= 0
    attn = torch.where(valid, cls_attn.detach().float(), torch.zeros((), device=cls_attn.device))
    mass = torch.zeros(cls_attn.shape[0], n_organs, device=cls_attn.device)
    mass.scatter_add_(1, organ_id.clamp(min=0), attn)
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=1e-12), torch.zeros_like(mass))


def water_fill(weights: Tensor, present: Tensor, target: Tensor) -> Tensor:
    """Probabilities p = min(1, c * weights) over present entries with sum_o p = target per row.

    Args:
        weights: (B, O) non-negative, summing to 1 over each row's present entries.
        present: (B, O) bool; absent entries get p = 0.
        target: (B,) expected number of masked entries, below the row's present count.
    """
    capped = torch.zeros_like(present)
    p = torch.zeros_like(weights)
    for _ in range(present.shape[1] + 1):
        free = present & ~capped
        rest = (target - capped.sum(dim=1)).unsqueeze(1)
        w_free = torch.where(free, weights, torch.zeros_like(weights))
        norm = w_free.sum(dim=1, keepdim=True)
        # A row whose free organs have zero weight spreads its rest evenly over them.
        even = free.float() / free.sum(dim=1, keepdim=True).clamp(min=1)
        share = torch.where(norm > 0, w_free / norm.clamp(min=1e-30), even)
        p = torch.where(capped, torch.ones_like(p), rest * share)
        new_capped = capped | (free & (p >= 1.0))
        if torch.equal(new_capped, capped):
            break
        capped = new_capped
    return p.clamp(0.0, 1.0) * present


class OrganMasker(nn.Module):
    """Whole-organ and in-organ patch masking for the student view.

    Args:
        organs: the organ vocabulary (``cfg.data.organ_set()``).
        cfg: ``cfg.train.masking`` (policy, ratios, temperature, saliency momentum, global weight).

    State (buffers, so it survives export/import as plain tensors): ``local_saliency`` (O,),
    ``local_count`` (O,) subjects seen per organ, ``global_saliency`` (O,), ``global_known`` (O,),
    ``global_weight`` (). Mask-rate counters are non-persistent metrics (``reset_metrics``).
    """

    # Buffers, declared so a type checker sees tensors (nn.Module.__getattr__ says Tensor | Module).
    local_saliency: Tensor
    local_count: Tensor
    global_saliency: Tensor
    global_known: Tensor
    global_weight: Tensor
    stat_masked: Tensor
    stat_present: Tensor

    def __init__(self, organs: OrganSet, cfg: MaskingConfig) -> None:
        super().__init__()
        self.organs = organs
        self.cfg = cfg
        n = len(organs)
        self.register_buffer("local_saliency", torch.ones(n))
        self.register_buffer("local_count", torch.zeros(n))
        self.register_buffer("global_saliency", torch.ones(n))
        self.register_buffer("global_known", torch.zeros(n))
        self.register_buffer("global_weight", torch.tensor(float(cfg.global_weight)))
        self.register_buffer("stat_masked", torch.zeros(n), persistent=False)
        self.register_buffer("stat_present", torch.zeros(n), persistent=False)

    # ------------------------------------------------------------------ saliency estimate

    def _check_rows(self, name: str, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != len(self.organs):
            raise ValueError(f"OrganMasker: {name} {tuple(x.shape)} must be (B, {len(self.organs)}) over organs {self.organs.names}")

    @torch.no_grad()
    def update(self, shares: Tensor, present: Tensor) -> None:
        """Fold a batch's attention shares (B, O) into the running estimate.

        Args:
            shares: :func:`organ_attention_shares` of the teacher's full-view forward.
            present: (B, O) bool organ presence; only subjects with an organ update that organ.
        """
        self._check_rows("shares", shares)
        self._check_rows("present", present)
        present = present.to(shares.device)
        relative = shares.float() * present.sum(dim=1, keepdim=True).float()
        n_here = present.float().sum(dim=0)
        # Over the global batch: one all-reduce of (sums, counts) when ranks share it.
        total = all_sum(torch.stack([(relative * present).sum(dim=0), n_here]))
        n = total[1]
        batch_mean = total[0] / n.clamp(min=1)
        seen = n > 0
        m = self.cfg.saliency_momentum
        first = seen & (self.local_count == 0)
        ema = m * self.local_saliency + (1.0 - m) * batch_mean
        self.local_saliency.copy_(torch.where(first, batch_mean, torch.where(seen, ema, self.local_saliency)))
        self.local_count.add_(n_here)  # a counter: the ranks' increments are summed after the step

    def local_estimate(self) -> Tensor:
        """This site's estimate (O,) in relative units, NaN for organs it never saw (for the server)."""
        return torch.where(self.local_count > 0, self.local_saliency, torch.full_like(self.local_saliency, math.nan))

    @torch.no_grad()
    def set_global(self, global_saliency: Tensor, weight: float | None = None) -> None:
        """Blend in a federation-wide estimate.

        Args:
            global_saliency: (O,) in the units of :meth:`local_estimate`; NaN = unknown organ.
            weight: blend weight w of the global estimate (default ``cfg.global_weight``).
        """
        g = torch.as_tensor(global_saliency, dtype=torch.float32, device=self.global_saliency.device)
        if g.shape != self.global_saliency.shape:
            raise ValueError(f"OrganMasker.set_global: global saliency {tuple(g.shape)} must be ({len(self.organs)},) over organs {self.organs.names}")
        known = torch.isfinite(g)
        if (g[known] < 0).any():
            bad = [self.organs.names[i] for i in torch.nonzero(known & (g < 0)).flatten().tolist()]
            raise ValueError(f"OrganMasker.set_global: negative saliency for {', '.join(bad)}")
        w = self.cfg.global_weight if weight is None else weight
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"OrganMasker.set_global: weight {w} must be in [0, 1]")
        self.global_saliency.copy_(torch.where(known, g, torch.ones_like(g)))
        self.global_known.copy_(known.float())
        self.global_weight.fill_(w)

    def saliency(self) -> Tensor:
        """The blended estimate s'_o (O,); 1 (neutral) for organs known neither here nor globally."""
        local_seen = self.local_count > 0
        known = self.global_known > 0
        w = self.global_weight
        blend = w * self.global_saliency + (1.0 - w) * self.local_saliency
        neutral = torch.ones_like(self.local_saliency)
        return torch.where(local_seen & known, blend, torch.where(known, self.global_saliency, torch.where(local_seen, self.local_saliency, neutral)))

    # ------------------------------------------------------------------ organ masks

    def probabilities(self, present: Tensor) -> Tensor:
        """Per-organ masking probabilities (B, O) for subjects with organs ``present`` (B, O) bool."""
        self._check_rows("present", present)
        present = present.bool().to(self.local_saliency.device)
        n_present = present.sum(dim=1).float()
        if self.cfg.policy == "none":
            return torch.zeros(present.shape, device=present.device)
        if self.cfg.policy == "random":
            return present.float() * self.cfg.organ_mask_ratio
        logits = torch.log(self.saliency().clamp(min=1e-12)) / self.cfg.temperature
        logits = torch.where(present, logits.expand_as(present), torch.full(present.shape, -math.inf, device=present.device))
        q = torch.softmax(logits, dim=1).nan_to_num(0.0)  # all-absent rows give NaN -> 0
        return water_fill(q, present, self.cfg.organ_mask_ratio * n_present)

    @torch.no_grad()
    def sample(self, present: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw an organ mask (B, O) bool (True = organ masked in the student view).

        Args:
            present: (B, O) bool organ presence (``SubjectBatch.present``).
            generator: CPU random generator (reproducible masks); None: draws keyed by each row's
                place in the global batch in a training micro-step, else the global RNG.
        """
        p = self.probabilities(present)
        present = present.bool().to(p.device)
        rows = torch.arange(p.shape[0])
        u = draws_for("masks/organs", rows, p.shape[0], generator).rand(p.shape[1]).to(p.device)
        mask = (u < p) & present
        lost_all = present.any(dim=1) & (mask.sum(dim=1) == present.sum(dim=1))
        if lost_all.any():
            if self.cfg.policy == "sgm":
                score = -self.saliency().expand_as(p)
            else:
                score = draws_for("masks/keep", rows, p.shape[0], generator).rand(p.shape[1]).to(p.device)
            score = torch.where(present, score, torch.full_like(score, -math.inf))
            keep = torch.zeros_like(mask).scatter_(1, score.argmax(dim=1, keepdim=True), True)
            mask = mask & ~(keep & lost_all.unsqueeze(1))
        self.stat_masked.add_(mask.sum(dim=0).to(self.stat_masked))
        self.stat_present.add_(present.sum(dim=0).to(self.stat_present))
        return mask

    @torch.no_grad()
    def sample_patch_mask(
        self,
        batch: SubjectBatch,
        organ_mask: Tensor,
        num_patches: dict[str, int],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Random in-organ patch masks: organ -> (n_o, num_patches) bool, True = patch masked.

        In each image of an organ that is not organ-masked, round(patch_mask_ratio * P) of its P
        patches are masked (at most P - 1: hiding an organ entirely is the organ mask's decision);
        rows of organ-masked images are all True, so the dict alone describes the student view.

        Args:
            batch: the batch being masked.
            organ_mask: (B, O) bool from :meth:`sample`.
            num_patches: organ -> patches per image (``cfg.data.organs[o].num_patches``).
            generator: CPU random generator (None: as in :meth:`sample`).
        """
        self._check_rows("organ_mask", organ_mask)
        out: dict[str, Tensor] = {}
        for organ, rows in batch.index.items():
            if organ not in num_patches:
                raise KeyError(f"OrganMasker.sample_patch_mask: no patch count for organ {organ!r}")
            n_p = num_patches[organ]
            k = min(int(round(self.cfg.patch_mask_ratio * n_p)), n_p - 1)
            u = draws_for(f"masks/patches/{organ}", rows, batch.size, generator).rand(n_p)
            ranks = u.argsort(dim=1).argsort(dim=1)
            m = (ranks < k).to(rows.device)
            whole = organ_mask[rows, self.organs.index(organ)].to(rows.device)
            out[organ] = m | whole.unsqueeze(1)
        return out

    # ------------------------------------------------------------------ metrics

    def reset_metrics(self) -> None:
        self.stat_masked.zero_()
        self.stat_present.zero_()

    def metrics(self) -> dict[str, float]:
        """``saliency/<organ>``: the blended estimate as shares over the organs known here or
        globally; ``mask_rate/<organ>``: empirical organ mask rate since :meth:`reset_metrics`."""
        out: dict[str, float] = {}
        known = (self.local_count > 0) | (self.global_known > 0)
        s = self.saliency()
        total = float(s[known].sum()) if known.any() else 0.0
        for i, name in enumerate(self.organs.names):
            if known[i] and total > 0:
                out[f"saliency/{name}"] = float(s[i]) / total
            if self.stat_present[i] > 0:
                out[f"mask_rate/{name}"] = float(self.stat_masked[i] / self.stat_present[i])
        return out
