"""What a linear probe reads from a frozen encoder: the CLS token, per-organ mean tokens, or both.

Our choice (docs/evaluation.md, "Readouts"). The CLS is what self-distillation trains; the
per-organ mean of the final tokens is what any encoder (even a random one) keeps of each organ's
pixels, so probing both separates "the CLS collapsed" from "the tokens carry nothing".

- ``cls``: the normed CLS token, (D,).
- ``organ_mean``: per organ in vocabulary order, the mean of its final tokens, zero where the
  organ is absent, then the O presence flags, (O x D + O,).
- ``both``: ``cls`` then ``organ_mean``.

The probes standardise every feature with the probe-train subjects' mean and std
(:func:`fedpanfm.evaluation.probe.fit_probes`), so the readouts' scales do not matter.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fedpanfm.evaluation.embed import Embeddings

READOUTS: tuple[str, ...] = ("cls", "organ_mean", "both")


def organ_mean_features(emb: Embeddings) -> Tensor:
    """(N, O x D + O) per-organ mean tokens (zero where absent) and the presence flags."""
    if emb.organ_mean is None:
        raise ValueError("organ_mean readout: these embeddings carry no per-organ token means")
    mean = emb.organ_mean * emb.present[..., None].to(emb.organ_mean.dtype)
    return torch.cat([mean.flatten(1), emb.present.to(mean.dtype)], dim=1)


def readout(emb: Embeddings, name: str) -> Embeddings:
    """``emb`` with ``cls`` replaced by the features of readout ``name`` (what the probes read).

    Args:
        emb: embeddings as :func:`~fedpanfm.evaluation.embed.embed_batches` returns them
            (``readout == "cls"``, ``organ_mean`` set for the other readouts).
        name: one of :data:`READOUTS`.
    """
    if name not in READOUTS:
        raise ValueError(f"unknown readout {name!r}; known: {', '.join(READOUTS)}")
    if emb.readout == name:
        return emb
    if emb.readout != "cls":
        raise ValueError(f"readout {name!r}: the embeddings already hold the {emb.readout!r} readout")
    if name == "organ_mean":
        feats = organ_mean_features(emb)
    else:  # both
        feats = torch.cat([emb.cls.float(), organ_mean_features(emb)], dim=1)
    return dataclasses.replace(emb, cls=feats, readout=name)


__all__ = ["READOUTS", "organ_mean_features", "readout"]
