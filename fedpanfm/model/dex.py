"""Director-experts (DEX) MLP layers (REFERENCES.md, DEX).

A DEX layer replaces a transformer block's MLP by a router, a pool of ``E`` expert MLPs and one
director MLP of the same shape. Routing is image-wise: the router reads the CLS token, so all
tokens of one image go through the same top-k experts, mixed by the renormalised gates. The
director gets no gradient: it follows the experts by group EMA (:mod:`fedpanfm.model.group_ema`)
and its output is the distillation target for the layer's expert output.

Gate mass bookkeeping: ``DexAux.gate_mass()`` is one batch's routed gate mass per expert; the
trainer sums it over a round for the federation (which weights expert e by it). The buffer
``gate_mass_acc`` only holds the mass since the last :meth:`DEXLayer.group_ema_update`, which
consumes and resets it; :meth:`DEXLayer.pending_gate_mass` reads it without resetting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.config import DexConfig
from fedpanfm.global_batch import RowDraws, all_sum, current
from fedpanfm.model.group_ema import group_ema_module_

INIT_STD = 0.02


def init_linear(layer: nn.Linear) -> None:
    """Truncated-normal weights (std 0.02) and zero bias: the ViT/DINO initialisation."""
    nn.init.trunc_normal_(layer.weight, std=INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: input width (and output width unless ``out_dim`` is given).
        hidden: hidden width.
        out_dim: output width (the organ-contrast projector's embedding; default ``dim``).
    """

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim)
        init_linear(self.fc1)
        init_linear(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PlainMLP(MLP):
    """The block MLP when DEX is disabled (ablation); called like a :class:`DEXLayer`.

    Args:
        dim: input and output width.
        hidden: hidden width.
    """

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, None]:  # type: ignore[override]
        """x (B, T, D) -> (y (B, T, D), None); ``pad`` is accepted for a uniform call."""
        return super().forward(x), None


@dataclass
class DexAux:
    """What one DEX layer's forward reports (for the losses and the federation).

    Args:
        gates: (B, E) renormalised top-k gates, 0 for experts outside an image's top-k.
        probs: (B, E) full router probabilities before top-k (for the load-balance loss); in
            training they include the router noise: the distribution the routing really used.
        topk: (B, k) long, the experts each image was routed to.
        expert_out: (B, T, D) the layer output (gate-weighted expert mix, before the residual).
        director_out: (B, T, D) the director's output on the same input (no grad), or None when
            not in training or distillation is off.
        pad: (B, T) bool, True at padding tokens.
    """

    gates: Tensor
    probs: Tensor
    topk: Tensor
    expert_out: Tensor
    director_out: Tensor | None
    pad: Tensor

    def gate_mass(self) -> Tensor:
        """(E,) gate mass this batch routed to each expert (every row is a real image)."""
        return self.gates.detach().sum(dim=0)


class DEXLayer(nn.Module):
    """Router + E expert MLPs + a director MLP.

    Args:
        dim: token width D.
        hidden: hidden width of every MLP.
        cfg: the DEX config (experts, top_k, temperature, noise_std, usage_momentum).
        distill: compute the director's output in training (the distillation target). Can be
            switched later through the attribute of the same name.

    Attributes:
        noise_std: current router-noise std; the trainer sets it each step (cosine to 0).
    """

    usage: Tensor
    gate_mass_acc: Tensor

    def __init__(self, dim: int, hidden: int, cfg: DexConfig, distill: bool = True) -> None:
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.experts:
            raise ValueError(f"DEXLayer: top_k = {cfg.top_k} must be in [1, experts = {cfg.experts}]")
        self.num_experts = cfg.experts
        self.top_k = cfg.top_k
        self.temperature = cfg.temperature
        self.usage_momentum = cfg.usage_momentum
        self.noise_std = float(cfg.noise_std)
        self.distill = distill
        self.router = nn.Linear(dim, cfg.experts)
        init_linear(self.router)
        self.director = MLP(dim, hidden)
        self.director.requires_grad_(False)
        self.experts = nn.ModuleList([copy.deepcopy(self.director).requires_grad_(True) for _ in range(cfg.experts)])
        self.register_buffer("usage", torch.full((cfg.experts,), 1.0 / cfg.experts))
        self.register_buffer("gate_mass_acc", torch.zeros(cfg.experts))

    def router_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(batch, E) usage-aware router noise (our design; the DEX abstract fixes only its aim).

        noise_e = sigma * (eps_e + deficit_e), eps ~ N(0, 1),
        deficit_e = clamp(1 - E * share_e, 0, 1), share = usage / usage.sum().

        At balanced usage this is plain exploration noise; an expert used less than its fair
        share 1/E gets a positive shift of up to sigma (an unused one exactly sigma), so it
        enters some images' top-k and receives gradient. sigma decays to 0, so the bias vanishes.

        Without a generator, inside a training micro-step (``fedpanfm/global_batch.py``), eps of
        an image is keyed by its place in the site's global batch and by the call's order in
        the step (layer by layer, global views before local ones), as one device would draw it.
        """
        share = self.usage.float() / self.usage.float().sum().clamp_min(1e-12)
        deficit = (1.0 - self.num_experts * share).clamp(0.0, 1.0)
        part = current() if generator is None else None
        if part is not None:
            draws = RowDraws(part, f"router/{part.noise_calls}", torch.arange(batch), batch)
            part.noise_calls += 1
            eps = draws.randn(self.num_experts).to(self.usage.device)
        else:
            eps = torch.randn(batch, self.num_experts, device=self.usage.device, generator=generator)
        return self.noise_std * (eps + deficit[None])

    def route(self, cls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image-wise routing from the CLS tokens (B, D) -> (gates (B,E), probs (B,E), topk (B,k))."""
        logits = self.router(cls).float()
        if self.training and self.noise_std > 0:
            logits = logits + self.router_noise(cls.shape[0]).to(logits.device)
        probs = F.softmax(logits / self.temperature, dim=-1)
        top_p, topk = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, topk, top_p / top_p.sum(dim=-1, keepdim=True))
        return gates, probs, topk

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, DexAux]:
        """Route each image and mix its experts.

        Args:
            x: (B, T, D) normed tokens, the CLS token at position 0.
            pad: (B, T) bool, True at padding tokens (they flow through, results unused).

        Returns:
            y (B, T, D) and the :class:`DexAux` of this call.
        """
        gates, probs, topk = self.route(x[:, 0])
        # The B * k (image, expert) slots sorted by expert: one gather puts every expert's images
        # in one contiguous slice, each expert runs once on its slice (a view, no copy), and one
        # index_add scatters the gated outputs back (the per-expert gather / index_add of every
        # expert cost E full copies of the activations). A stable sort keeps each image's
        # experts in id order, so the sums are those of the per-expert loop.
        slot_expert = topk.flatten()
        order = slot_expert.argsort(stable=True)
        img = order.div(self.top_k, rounding_mode="floor")
        counts = torch.bincount(slot_expert, minlength=self.num_experts).tolist()
        xs = x.index_select(0, img)
        slot_gate = gates.gather(1, topk).flatten()[order].to(x.dtype)
        outs, lo = [], 0
        for expert, n in zip(self.experts, counts):
            if n:
                outs.append(expert(xs[lo : lo + n]))
            lo += n
        mixed = torch.cat(outs) if outs else xs  # no slot at all only for an empty batch
        y = torch.zeros_like(x).index_add_(0, img, mixed * slot_gate[:, None, None])
        director_out = None
        if self.training and self.distill:
            with torch.no_grad():
                director_out = self.director(x)
        if self.training:
            self._account(gates)
        return y, DexAux(gates=gates, probs=probs, topk=topk, expert_out=y, director_out=director_out, pad=pad)

    @torch.no_grad()
    def _account(self, gates: Tensor) -> None:
        """Update the usage EMA and the gate-mass accumulator with one batch's gates."""
        mass = gates.detach().float().sum(dim=0)
        # The usage share is the site's global batch's (all ranks alike: the next forward's noise
        # reads it); the accumulator counts this process's own mass (the ranks' are summed).
        total = all_sum(mass)
        share = total / total.sum().clamp_min(1e-12)
        m = self.usage_momentum
        self.usage.copy_(m * self.usage.float() + (1.0 - m) * share)
        self.gate_mass_acc.add_(mass.to(self.gate_mass_acc.dtype))

    def pending_gate_mass(self) -> Tensor:
        """(E,) copy of the gate mass routed since the last group-EMA update (not reset)."""
        return self.gate_mass_acc.detach().clone()

    @torch.no_grad()
    def group_ema_update(self, momentum: float) -> Tensor:
        """director <- m * director + (1 - m) * sum_e w_e * expert_e; resets ``gate_mass_acc``.

        w is the gate mass accumulated since the last update, normalised; with no mass (no
        training step since) the usage EMA, and if that is all zero too, uniform.

        Args:
            momentum: m in [0, 1] (cosine schedule 0.99 -> 0.999 in the trainer).

        Returns:
            the (E,) float64 weights used.
        """
        weights = self.gate_mass_acc.float()
        if weights.sum() <= 0:
            weights = self.usage.float()
        if weights.sum() <= 0:
            weights = torch.ones(self.num_experts)
        w = group_ema_module_(self.director, list(self.experts), weights, momentum)
        self.gate_mass_acc.zero_()
        return w


__all__ = ["DEXLayer", "DexAux", "MLP", "PlainMLP", "init_linear"]
