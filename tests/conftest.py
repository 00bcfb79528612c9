"""Shared test fixtures: a tiny experiment config and hand-built batches."""

from __future__ import annotations

import os

import pytest
import torch

from fedpanfm.config import ExperimentConfig, config_from_dict
from fedpanfm.data.batch import SubjectBatch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

TINY = {
    "data": {
        "batch_size": 4,
        "organs": {
            "brain": {"grid": [8, 8, 8], "patch": [4, 4, 4]},
            "heart": {"grid": [16, 16], "patch": [4, 4]},
            "adipose": {"grid": [16, 16], "patch": [4, 4]},
            "liver": {"grid": [8, 8, 8], "patch": [4, 4, 4]},
            "kidney": {"grid": [4, 8, 8], "patch": [4, 4, 4]},
            "spleen": {"grid": [4, 8, 8], "patch": [4, 4, 4]},
            "pancreas": {"grid": [4, 8, 8], "patch": [4, 4, 4]},
        },
    },
    "model": {
        "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0,
        "head_hidden_dim": 32, "head_bottleneck_dim": 16, "head_out_dim": 32,
        "dex": {"experts": 4, "top_k": 2},
    },
    "train": {"epochs": 1, "progress": False},
    "synth": {"sites": 2, "subjects": 6},
}


def tiny_config(overrides: list[str] | None = None) -> ExperimentConfig:
    """A config small enough for sub-second model tests."""
    return config_from_dict(TINY, "<tiny test config>", overrides)


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return tiny_config()


def make_batch(cfg: ExperimentConfig, organ_sets: list[list[str]], seed: int = 0, n_labels: int = 2) -> SubjectBatch:
    """A random batch; subject b holds exactly the organs ``organ_sets[b]``."""
    g = torch.Generator().manual_seed(seed)
    organs = cfg.data.organ_set()
    images: dict[str, torch.Tensor] = {}
    index: dict[str, torch.Tensor] = {}
    present = torch.zeros(len(organ_sets), len(organs), dtype=torch.bool)
    for o in organs:
        rows = [b for b, s in enumerate(organ_sets) if o in s]
        if not rows:
            continue
        grid = cfg.data.organs[o].grid
        images[o] = torch.randn(len(rows), 1, *grid, generator=g)
        index[o] = torch.tensor(rows, dtype=torch.long)
        present[rows, organs.index(o)] = True
    labels = torch.randint(0, 2, (len(organ_sets), n_labels), generator=g).float()
    return SubjectBatch(
        subject_ids=[f"s{b}" for b in range(len(organ_sets))],
        organ_names=organs.names,
        images=images,
        index=index,
        present=present,
        labels=labels,
        label_names=tuple(f"label{i}" for i in range(n_labels)),
    )
