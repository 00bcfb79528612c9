"""Embeddings of a cohort under a checkpoint's frozen teacher encoder, written for downstream work.

``export_embeddings(checkpoint, cohort, out)`` encodes every subject of the cohort (all its
sites pooled) once and writes one ``.npz`` file, readable with ``numpy.load(out)`` (no pickle):

    subject_ids    (N,)       str
    sites          (N,)       str, the site folder of each subject
    cls            (N, D)     float32, the CLS embedding
    organ          (N, O, D)  float32, the mean of each organ's final tokens; zeros where absent
    present        (N, O)     bool, the organs each subject has
    attention      (N, O)     float32, the CLS token's last-layer attention share on each organ
    labels         (N, L)     float32, the manifest's label columns, NaN = unknown
    organ_names    (O,)       str
    label_names    (L,)       str

Our choice: ``.npz`` rather than a framework format, because downstream work (a linear model,
a survival fit, a plot) rarely runs in torch, and numpy reads it with no code of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The arrays an export holds, in file order.
KEYS = ("subject_ids", "sites", "cls", "organ", "present", "attention", "labels", "organ_names", "label_names")


def export_embeddings(checkpoint: Path, cohort: Path, out: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Encode ``cohort`` with ``checkpoint``'s teacher encoder and write ``out`` (``.npz``).

    Args:
        checkpoint: a checkpoint folder (``model.safetensors`` and its ``config.yaml``).
        cohort: a cohort folder (site folders below it), labelled or not.
        out: the file to write; ``.npz`` is appended when missing.
        overrides: ``--set KEY=VALUE`` items applied to the checkpoint's config (e.g.
            ``evaluation.batch_size``, ``device``); architecture keys must not change.

    Returns:
        ``{"path", "subjects", "dim", "organs", "labels"}``.
    """
    import torch

    from fedpanfm.data.dataset import pooled_dataset
    from fedpanfm.evaluation.embed import collate_dataset, embed_batches, encoder_from_checkpoint
    from fedpanfm.train.distributed import pick_device

    encoder, cfg = encoder_from_checkpoint(Path(checkpoint), list(overrides))
    device = pick_device(cfg.device)
    encoder.to(device)
    batches = collate_dataset(pooled_dataset(Path(cohort), cfg), cfg)
    with torch.inference_mode():
        emb = embed_batches(encoder, batches, device=device)
    site_of = {sid: site for b in batches for sid, site in zip(b.subject_ids, b.sites or [""] * b.size)}
    assert emb.organ_mean is not None  # embed_batches always computes it
    arrays = {
        "subject_ids": np.asarray(emb.subject_ids, dtype=str),
        "sites": np.asarray([site_of.get(s, "") for s in emb.subject_ids], dtype=str),
        "cls": emb.cls.numpy().astype(np.float32),
        "organ": emb.organ_mean.numpy().astype(np.float32),
        "present": emb.present.numpy().astype(bool),
        "attention": emb.shares.numpy().astype(np.float32),
        "labels": emb.labels.numpy().astype(np.float32),
        "organ_names": np.asarray(emb.organ_names, dtype=str),
        "label_names": np.asarray(emb.label_names, dtype=str),
    }
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    # numpy's stub: a **dict may hold "allow_pickle" as far as mypy knows; these keys are array names.
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return {"path": out, "subjects": len(emb), "dim": int(arrays["cls"].shape[1]),
            "organs": len(emb.organ_names), "labels": len(emb.label_names)}


__all__ = ["KEYS", "export_embeddings"]
