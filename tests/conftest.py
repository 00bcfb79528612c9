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


def make_site(site_dir, cfg: ExperimentConfig, organ_sets: dict[str, list[str]], seed: int = 0,
              label_names: tuple[str, ...] = ("diabetes", "stroke")):
    """Write a small NIfTI site: subject -> organs; images at 1.5x the grid size, 2 mm voxels.

    Labels: subject k has diabetes = k % 2 and stroke unknown for odd k, else 0.
    Returns the manifest rows written.
    """
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    from fedpanfm.data.manifest import ManifestRow, write_manifest

    site_dir = Path(site_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for k, (sid, organs) in enumerate(organ_sets.items()):
        labels = {"diabetes": float(k % 2), "stroke": None if k % 2 else 0.0}
        for organ in organs:
            shape = [max(2, int(g * 1.5)) for g in cfg.data.organs[organ].grid]
            arr = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
            rel = f"img/{sid}_{organ}.nii.gz"
            (site_dir / "img").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(site_dir / rel))
            rows.append(ManifestRow(sid, organ, rel, {n: labels[n] for n in label_names}))
    write_manifest(site_dir, rows, list(label_names))
    return rows


def global_model_state(cfg: ExperimentConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The real PanFMSSL state dict of ``cfg`` (seeded), as the federation's global state."""
    from fedpanfm.model.meta_arch import PanFMSSL

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in PanFMSSL(cfg).state_dict().items()}


def fake_site_update(cfg: ExperimentConfig, global_state: dict[str, torch.Tensor], site: str, num_examples: int,
                     organ_subjects: list[float] | None = None, gate_mass: torch.Tensor | None = None,
                     seed: int = 0, scale: float = 0.1):
    """A SiteUpdate as a site would send it: every float tensor of ``global_state`` moved by
    seeded noise of std ``scale``; organ_subjects default: every subject has every organ; gate
    mass default: random positive (L, E) when the state has DEX experts."""
    from fedpanfm.federation.protocol import SiteUpdate

    g = torch.Generator().manual_seed(seed)
    n_organs = len(cfg.data.organ_set())
    state = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in global_state.items()}
    if gate_mass is None:
        e = cfg.model.dex.experts if cfg.model.dex.enabled else 0
        gate_mass = torch.rand(cfg.model.depth if e else 0, e, generator=g, dtype=torch.float64) * num_examples
    return SiteUpdate(
        site=site,
        state=state,
        num_examples=num_examples,
        organ_subjects=torch.tensor(organ_subjects if organ_subjects is not None else [float(num_examples)] * n_organs,
                                    dtype=torch.float64),
        gate_mass=gate_mass,
        saliency=torch.rand(n_organs, generator=g, dtype=torch.float64),
        organ_names=list(cfg.data.organ_set().names),
        metrics={"loss/total": float(torch.rand(1, generator=g)), "loss/dino": 1.0},
        steps=3,
    )


def site_message(content, message_type: str, server_round: int, dst_node: int):
    """A Flower ``Message`` to a site, as the ServerApp would send it.

    Explicit metadata: outside a Flower run there is no task identity to derive it from.
    """
    import time

    from flwr.app import Message, Metadata

    meta = Metadata(run_id=1, message_id=f"{message_type}-{server_round}", src_node_id=1, dst_node_id=dst_node,
                    reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600.0,
                    message_type=message_type)
    return Message(content=content, metadata=meta)


def train_message(cfg: ExperimentConfig, state: dict[str, torch.Tensor], server_round: int, dst_node: int):
    """The server's train instruction of ``server_round`` (2 rounds, 20 planned steps, uniform saliency)."""
    from fedpanfm.federation.protocol import TrainInstruction
    from fedpanfm.federation.tensor_codec import state_to_arrayrecord

    organs = cfg.data.organ_set()
    instr = TrainInstruction(
        arrays=state_to_arrayrecord(state), server_round=server_round, num_rounds=2,
        start_step=0, total_steps=20, global_saliency=[1.0 / len(organs)] * len(organs),
        organ_names=list(organs.names), teacher_policy=cfg.federation.teacher_policy,
    )
    return site_message(instr.to_recorddict(), "train", server_round, dst_node)


def one_site_run(tmp) -> tuple[ExperimentConfig, dict[str, str]]:
    """A generated one-site tiny cohort under ``tmp`` and the Flower run config naming its YAML."""
    from pathlib import Path

    from fedpanfm.data.synthetic import generate_cohort

    cfg = tiny_config([f"cohort={tmp / 'cohort'}", "synth.sites=1", "synth.subjects=8",
                       "data.val_fraction=0.25", "data.batch_size=3", "device=cpu"])
    generate_cohort(Path(cfg.cohort), cfg)
    path = tmp / "config.yaml"
    path.write_text(cfg.to_yaml())
    return cfg, {"config": str(path), "overrides": ""}
