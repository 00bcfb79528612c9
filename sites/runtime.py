"""What a site needs to train in one Flower call: its data, its split, its kept state.

A ClientApp process may serve several sites (in simulation one Ray actor runs the ClientApp
for whichever site's message comes next), so nothing site-specific lives in module globals:
the site is resolved from ``context.node_config`` on every call and what a site keeps
between rounds lives in ``context.state``. The DeepSpeed engine is process state
(``get_trainer(cfg)`` caches one per process); every call loads the site's weights and
counters into it before training.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.collate import make_loader
from fedpanfm.data.dataset import SiteDataset, list_sites, open_site_dataset, split_subjects
from fedpanfm.site_names import check_site_name

#: ``context.state`` record names (``RecordDict`` keys) a site keeps between rounds.
STATE_ARRAYS = "fedpanfm.local"
STATE_CONFIG = "fedpanfm.site"


class SiteConfigError(ValueError):
    """The node config does not name a usable site; the message says which key and why."""


def site_seed(name: str, seed: int) -> int:
    """A seed fixed by the site name and the experiment seed.

    Python's ``hash`` is salted per process, so the name is hashed with SHA-256: every process
    (and every re-run) splits a site's subjects the same way.

    Args:
        name: the site name.
        seed: the experiment seed (``cfg.seed``).
    """
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _checked_name(name: str, where: str) -> str:
    # One validator for every name that enters (fedpanfm.site_names.check_site_name): it names files,
    # TensorBoard runs and log lines here and on the server.
    try:
        return check_site_name(name, where)
    except ValueError as exc:
        raise SiteConfigError(str(exc)) from None


def resolve_site(node_config: Mapping[str, Any], cfg: ExperimentConfig) -> tuple[str, Path]:
    """The site name and folder a node serves.

    Args:
        node_config: the node's Flower config. In simulation ``partition-id`` = k picks the
            k-th site folder of ``cfg.cohort`` (``list_sites`` order); in deployment
            ``site-name`` and ``data-dir`` (a site folder) name it.
        cfg: the experiment config (``cfg.cohort`` is read in simulation).
    """
    if "partition-id" in node_config:
        k = int(node_config["partition-id"])
        sites = list_sites(Path(cfg.cohort))
        if not 0 <= k < len(sites):
            raise SiteConfigError(
                f"node config partition-id={k}: cohort {cfg.cohort} has {len(sites)} site(s) "
                f"(0..{len(sites) - 1}); run as many supernodes as sites"
            )
        site_dir = Path(sites[k])
        return _checked_name(site_dir.name, f"cohort {cfg.cohort}: site folder"), site_dir
    missing = [key for key in ("site-name", "data-dir") if key not in node_config]
    if missing:
        raise SiteConfigError(
            f"node config lacks {', '.join(missing)} (have: {', '.join(map(str, node_config)) or 'none'}); "
            "start the supernode with --node-config \"site-name='NAME' data-dir='/path/to/site'\""
        )
    name = _checked_name(str(node_config["site-name"]), "node config site-name")
    site_dir = Path(str(node_config["data-dir"]))
    if not (site_dir / "manifest.csv").is_file():
        raise SiteConfigError(f"site {name}: data-dir {site_dir} holds no manifest.csv")
    return name, site_dir


def local_only_keys(keys: list[str], cfg: ExperimentConfig) -> list[str]:
    """State-dict keys a site keeps for itself and restores after loading the global weights.

    Our design: the masker's state (``masker.*``: the site's own running organ saliency) is
    always local; SGM blends it with the federation's saliency, which the server sends apart.
    With ``federation.teacher_policy == "local"`` (FedU / FedEMA style) the teacher and the
    teacher-output centres (``*_loss.center``) are the site's own too.

    Args:
        keys: all state-dict keys of the model.
        cfg: the experiment config.
    """
    from fedpanfm.federation.teacher_policy import site_keeps

    return site_keeps(keys, cfg.federation.teacher_policy)


@dataclass
class SiteRuntime:
    """One site's data and kept state, resolved for one Flower call.

    Args:
        cfg: the experiment config.
        name: the site name (its folder name in simulation).
        site_dir: the site folder (holds ``manifest.csv``).
        train_ids: subject ids the site trains on.
        val_ids: held-out subject ids (validation SSL loss).
        dataset: the whole site, validated once; the train / val loaders are subsets of it.
    """

    cfg: ExperimentConfig
    name: str
    site_dir: Path
    train_ids: list[str]
    val_ids: list[str]
    dataset: SiteDataset

    @classmethod
    def from_context(cls, context: Context, cfg: ExperimentConfig) -> "SiteRuntime":
        """Resolve the site from ``context.node_config`` and split its subjects.

        Args:
            context: the Flower context of this call.
            cfg: the experiment config.
        """
        name, site_dir = resolve_site(context.node_config, cfg)
        dataset = open_site_dataset(site_dir, cfg)
        train_ids, val_ids = split_subjects(dataset.subject_ids, cfg.data.val_fraction, site_seed(name, cfg.seed))
        if not train_ids:
            raise SiteConfigError(f"site {name} ({site_dir}): no training subjects after the split")
        return cls(cfg=cfg, name=name, site_dir=site_dir, train_ids=list(train_ids), val_ids=list(val_ids),
                   dataset=dataset)

    def loader(self, split: str, round_seed: int = 0) -> Any:
        """A batch loader over the ``"train"`` or ``"val"`` subjects.

        Args:
            split: ``"train"`` (shuffled, reshuffled each round by ``round_seed``) or ``"val"``.
            round_seed: mixed into the shuffle seed so each round sees another order.
        """
        ids = {"train": self.train_ids, "val": self.val_ids}[split]
        dataset = self.dataset.subset(ids)
        seed = site_seed(self.name, self.cfg.seed) + round_seed
        return make_loader(dataset, self.cfg, shuffle=split == "train", seed=seed)

    # ----------------------------------------------------------------- schedules

    def steps_per_round(self) -> int:
        """Optimiser steps this site takes per round (``cfg.train.epochs`` passes, no dropped batch)."""
        batches = math.ceil(len(self.train_ids) / self.cfg.data.batch_size) * self.cfg.train.epochs
        return max(1, batches // self.cfg.deepspeed.gradient_accumulation_steps)

    def schedule_position(self, kept: Mapping[str, Any], start_step: int, total_steps: int,
                          num_rounds: int) -> dict[str, int]:
        """Where this site's LR / momentum / temperature schedules stand at the start of a round.

        Our design: the server does not see the sites' data, so its ``start_step / total_steps``
        is read as the share of the run already done; each site sizes its schedules by its own
        steps (``num_rounds * steps_per_round``). A site continues from the step it kept; at its
        first round it starts at the federation's share (a late joiner skips the warm-up the
        others did).

        Args:
            kept: the schedule state this site kept (``{}`` at its first round).
            start_step: the server's schedule position for this round.
            total_steps: the server's planned steps for the run.
            num_rounds: rounds planned in total.
        """
        total = num_rounds * self.steps_per_round()
        if kept:
            return {"step": int(kept["step"]), "total_steps": total}
        return {"step": round(total * start_step / total_steps), "total_steps": total}

    # ----------------------------------------------------------------- kept state

    def load_kept(self, context: Context) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What this site kept last round: (local tensors, schedule state); both empty at first.

        Args:
            context: the Flower context of this call.
        """
        arrays = context.state.get(STATE_ARRAYS)
        tensors = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) and len(arrays) else {}
        conf = context.state.get(STATE_CONFIG)
        if isinstance(conf, ConfigRecord):
            if conf["site"] != self.name:
                # One context belongs to one node; a different name means a mis-configured node.
                raise SiteConfigError(f"context state belongs to site {str(conf['site'])}, not {self.name}")
            return tensors, json.loads(str(conf["schedule"]))
        return tensors, {}

    def keep(self, context: Context, model_state: dict[str, torch.Tensor], schedule: dict[str, Any]) -> None:
        """Store the local-only tensors and the schedule state in ``context.state``.

        Args:
            context: the Flower context (its ``state`` survives to the next round).
            model_state: the full state dict after training.
            schedule: ``LocalTrainer.schedule_state()`` after training.
        """
        keys = local_only_keys(list(model_state), self.cfg)
        context.state[STATE_ARRAYS] = ArrayRecord({k: model_state[k] for k in keys})
        context.state[STATE_CONFIG] = ConfigRecord({"site": self.name, "schedule": json.dumps(schedule)})
