"""``python -m bench.organ_ssl_probe``: can self-supervision alone read one organ's disease structure?

Issue 14's question below the study: the study's recipe gains +0.02 to +0.04 macro AUROC over a
random encoder (docs/results.md). This probe removes everything but one organ and one objective.
It renders ``--organ`` of generator v2 (docs/synthetic-cohort.md) for ``--train`` subjects and
``--eval`` other subjects (in memory, the study's grid, each image standardised), trains a small
encoder with SimCLR (Chen et al. 2020: two random crops of each image are a positive pair, every
other crop of the batch a negative, InfoNCE at temperature 0.2) and prints the 5-fold
cross-validated ridge R^2 of the latent factors read from its pooled features, before and after.

The encoder has the shape of the study's organ tokenizer (``--arch stem``: two 3x3 convolutions of
16 channels, an 8x8 patch embedding to 64, one residual token MLP, the mean over tokens) or a
deeper plain CNN (``--arch cnn``). Crops are exact pixels (no resampling: it blurs the texture
that carries disease) with random quarter turns and flips. ``--pair crop-whole`` pairs a crop
(the query) with its whole image (the key, turned and flipped), InfoNCE from the queries to the
batch's keys only: the pair the recipe's organ contrast makes when local views hold crops
(``train.local_crop``). Everything here is our design.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpanfm.data.synthetic_factors import child_rng, sample_factors, sample_scanner, visible_factors
from fedpanfm.data.synthetic_render import render_organ

#: The study's 2D grids (configs/study.yaml).
GRIDS = {"brain": 24, "heart": 32, "adipose": 32, "liver": 24, "kidney": 24, "spleen": 24, "pancreas": 24}
#: Factors printed per organ: what its renderer reads (docs/synthetic-cohort.md) and the nuisance.
READ = {
    "brain": ("neuro", "age", "vascular", "body_size"),
    "heart": ("cardiac", "vascular", "cardiac_phase", "body_size"),
    "adipose": ("metabolic", "visceral_fat", "body_size"),
    "liver": ("steatosis", "inflammatory", "metabolic", "body_size"),
    "kidney": ("renal", "age", "vascular", "body_size"),
    "spleen": ("splenic", "inflammatory", "body_size"),
    "pancreas": ("pancreatic", "inflammatory", "metabolic", "age", "body_size"),
}


def render(organ: str, n: int, seed: int) -> tuple[Tensor, dict[str, np.ndarray]]:
    """(n, 1, g, g) standardised images of ``organ`` for n subjects at one of 2 scanners, and their factors."""
    rng = np.random.default_rng(seed)
    factors = sample_factors(rng, n)
    scanners = [sample_scanner(child_rng(seed, "site", k)) for k in range(2)]
    g = GRIDS[organ]
    images = np.zeros((n, 1, g, g), np.float32)
    for i in range(n):
        seen = visible_factors({k: float(v[i]) for k, v in factors.items()}, 1.0)
        x = render_organ(organ, (g, g), seen, scanners[i % 2], child_rng(seed, "image", i, organ))
        images[i, 0] = (x - x.mean()) / (x.std() + 1e-6)
    return torch.from_numpy(images), {k: np.asarray(v) for k, v in factors.items()}


class StemEncoder(nn.Module):
    """The study tokenizer's shape: conv stem, patch embedding, one token MLP, mean over tokens."""

    def __init__(self, stem: int = 16, dim: int = 64, patch: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, padding=1), nn.GELU(), nn.Conv2d(stem, stem, 3, padding=1), nn.GELU())
        self.embed = nn.Conv2d(stem, dim, patch, stride=patch)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        pad = (-x.shape[-1]) % self.patch
        tokens = self.embed(self.stem(F.pad(x, (0, pad, 0, pad)))).flatten(2).transpose(1, 2)
        return self.norm(tokens + self.mlp(tokens)).mean(dim=1)


def cnn_encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def crops(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` window per image, exact pixels, a random quarter turn and flip per batch."""
    n, _, h, w = x.shape
    i = torch.randint(0, h - size + 1, (n,), generator=gen).tolist()
    j = torch.randint(0, w - size + 1, (n,), generator=gen).tolist()
    out = torch.stack([x[a, :, i[a]:i[a] + size, j[a]:j[a] + size] for a in range(n)])
    out = torch.rot90(out, int(torch.randint(0, 4, (1,), generator=gen)), (2, 3))
    return out.flip(3) if bool(torch.rand(1, generator=gen) < 0.5) else out


def info_nce(encoder: nn.Module, projector: nn.Module, x: Tensor, size: int, pair: str, gen: torch.Generator) -> Tensor:
    """The InfoNCE (temperature 0.2) of one batch ``x`` under ``pair`` (``crops`` or ``crop-whole``)."""
    b = x.shape[0]
    if pair == "crops":
        z = F.normalize(projector(encoder(torch.cat([crops(x, size, gen), crops(x, size, gen)]))), dim=1)
        logits = (z @ z.T / 0.2).fill_diagonal_(-torch.inf)
        return F.cross_entropy(logits, torch.cat([torch.arange(b) + b, torch.arange(b)]))
    query = F.normalize(projector(encoder(crops(x, size, gen))), dim=1)
    key = F.normalize(projector(encoder(crops(x, x.shape[-1], gen))), dim=1)
    return F.cross_entropy(query @ key.T / 0.2, torch.arange(b))


def factor_r2(encoder: nn.Module, images: Tensor, factors: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, float]:
    """5-fold cross-validated ridge R^2 of each named factor from the standardised pooled features."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    with torch.no_grad():
        z = torch.cat([encoder(images[a:a + 256]) for a in range(0, len(images), 256)]).numpy()
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13))
    return {f: round(float(cross_val_score(ridge, z, factors[f], cv=5, scoring="r2").mean()), 3) for f in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organ", default="liver", choices=sorted(GRIDS))
    ap.add_argument("--arch", default="stem", choices=["stem", "cnn"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--crop", type=float, default=2 / 3, help="crop side as a share of the grid")
    ap.add_argument("--pair", default="crops", choices=["crops", "crop-whole"],
                    help="positive pair: two crops (SimCLR), or a crop against its whole image")
    ap.add_argument("--train", type=int, default=1600)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    x_train, _ = render(args.organ, args.train, seed=100 + args.seed)
    x_eval, f_eval = render(args.organ, args.eval, seed=1000)
    names = READ[args.organ]
    print(f"{args.organ}: {args.train} training and {args.eval} evaluation images rendered in {time.perf_counter() - t0:.0f} s")
    encoder = StemEncoder() if args.arch == "stem" else cnn_encoder()
    print(f"random init ({args.arch})  R^2 {factor_r2(encoder, x_eval, f_eval, names)}", flush=True)
    projector = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    opt = torch.optim.AdamW([*encoder.parameters(), *projector.parameters()], lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    size = max(4, round(args.crop * x_train.shape[-1]))
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = x_train[torch.randint(0, len(x_train), (args.batch,), generator=gen)]
        loss = info_nce(encoder, projector, x, size, args.pair, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: InfoNCE {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{'SimCLR' if args.pair == 'crops' else 'crop-whole'} {args.steps} steps  R^2 {factor_r2(encoder, x_eval, f_eval, names)}")


if __name__ == "__main__":
    main()
