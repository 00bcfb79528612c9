"""The local trainer: one PanFMSSL model inside one DeepSpeed engine, reused across calls.

A process that lives across federated rounds (a Ray actor in simulation serves several sites in
turn) must not rebuild the engine each time: an init costs seconds, and the first one in a fresh
machine compiles an op for minutes. :func:`get_trainer` therefore caches one trainer per
model-defining config, and the trainer keeps NO site state between calls: each call's caller
loads the site's weights (:meth:`LocalTrainer.load_state`, masker state included), step counter
(:meth:`LocalTrainer.set_schedule_state`) and resets the optimizer.

Mixed precision (our design): ``cfg.deepspeed.bf16`` (default ``auto``: on CUDA devices with native
bf16, :func:`~fedpanfm.train.distributed.autocast_dtype`) runs the forward under bf16 autocast while
weights, gradients and optimizer state stay fp32. DeepSpeed's own bf16 mode would cast the whole
module to bf16, teacher included, and the teacher's EMA step (1 - momentum = 0.004 to 0) falls
below bf16 resolution (2^-8 relative), so the teacher would stop moving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.global_batch import GlobalBatch, global_batch
from fedpanfm.train.data_parallel import BufferSync, RankShard, gather_objects
from fedpanfm.train.distributed import autocast_dtype, data_parallel_world, init_single_process, pick_device
from fedpanfm.train.schedules import Schedules

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    """What one :meth:`LocalTrainer.fit` call reports.

    Args:
        metrics: mean over the call's steps of every loss / metric the model reports, plus the
            masker's ``saliency/<organ>`` and ``mask_rate/<organ>`` at the end of the call.
        gate_mass: (L, E) float64, gate mass the student routed to each expert of each DEX layer,
            summed over the call (zeros rows for blocks without DEX).
        organ_subjects: (n_organs,) int64, distinct training subjects holding each organ.
        saliency: (n_organs,) float32, the masker's local saliency estimate after the call
            (``OrganMasker.local_estimate``: NaN for organs this trainer never saw).
        subjects: distinct training subjects seen.
        steps: optimizer steps taken.
        seconds: wall time of the call.
        history: per optimizer step, the step's metrics and ``schedule/<name>`` values.
    """

    metrics: dict[str, float]
    gate_mass: torch.Tensor
    organ_subjects: torch.Tensor
    saliency: torch.Tensor
    subjects: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list, repr=False)


def deepspeed_config(cfg: ExperimentConfig, world_size: int = 1) -> dict[str, Any]:
    """The ``deepspeed.initialize`` config dict built from ``cfg.deepspeed`` (``extra`` merged on top).

    Args:
        cfg: the experiment config; ``cfg.data.batch_size`` is the site's micro-batch, split
            evenly across its devices.
        world_size: the site's devices (data-parallel ranks).
    """
    ds = cfg.deepspeed
    if world_size < 1 or cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size = {cfg.data.batch_size} must split evenly across the site's "
                         f"{world_size} devices (a multiple of {world_size})")
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // world_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        # At ZeRO stage 0 the trainer clips itself (LocalTrainer.fit: one foreach norm over all
        # gradients instead of DeepSpeed's per-parameter Python loop); ZeRO 1/2 own the gradients.
        "gradient_clipping": 0.0 if ds.zero_stage == 0 else ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        # lr / weight decay here are placeholders: the trainer sets both on every step from the
        # schedules. torch_adam avoids compiling DeepSpeed's fused Adam op; torch's own fused
        # AdamW (CPU and CUDA) updates all parameters in one kernel per group instead of ~10 ops
        # per parameter (docs/performance.md: 0.5 s of a 3.9 s step at dim 192 went there).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "torch_adam": True, "fused": True},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    conf = _deep_merge(conf, ds.extra)
    for key in ("bf16", "fp16"):
        if isinstance(conf.get(key), dict) and conf[key].get("enabled"):
            raise ValueError(
                f"deepspeed.extra.{key}.enabled: DeepSpeed's {key} weights are not supported (the EMA "
                "teacher cannot move in 16-bit); set deepspeed.bf16: true for bf16 autocast instead"
            )
    if conf["zero_optimization"].get("stage", 0) == 3:
        raise ValueError("deepspeed.zero_stage = 3 partitions parameters, which the teacher EMA and "
                         "state export read directly; use stage 0-2")
    return conf


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: with (``wd_scale`` 1) and without weight decay.

    Args:
        model: the PanFMSSL model (frozen parameters, e.g. the teacher, are left out).
    """
    # DINO convention: no weight decay on biases, norm scales and 1-d embeddings/tokens.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}]
    return [g for g in groups if g["params"]]


class LocalTrainer:
    """PanFMSSL inside one DeepSpeed engine.

    Args:
        cfg: the experiment config (model, deepspeed, data.organs, train settings).
        device: the training device; None picks it from ``cfg.device``. A data-parallel rank
            (``sites/multi_device.py``) passes its own and has joined its group already.
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device | None = None) -> None:
        from fedpanfm.model.meta_arch import PanFMSSL

        self.cfg = cfg
        self.device = pick_device(cfg.device) if device is None else device
        self.world = data_parallel_world()
        if self.device.type == "cpu":
            # Tiny gradient / moment values fall into the fp32 subnormal range, whose arithmetic is
            # ~100x slower on x86; measured here (bench/step_time.py) a DeepSpeed step went from
            # ~0.2 s to 0.8-1.9 s. Flushing them to zero changes values below 1.2e-38 only.
            torch.set_flush_denormal(True)
            if cfg.train.cpu_threads > 0:
                # On a shared or oversubscribed machine every multi-threaded op waits for its
                # slowest (descheduled) thread: measured 7-10x slower steps with 2 threads than
                # with 1 at load 12 on 2 cores (docs/performance.md).
                torch.set_num_threads(cfg.train.cpu_threads)
        # Must precede the deepspeed import: DeepSpeed fixes its accelerator when first imported.
        if self.world == 1:
            init_single_process(self.device)
        import deepspeed

        # DeepSpeed logs its whole config at INFO on every initialize; keep its warnings only.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        self.model = PanFMSSL(cfg)
        self.organs = cfg.data.organ_set()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=param_groups(self.model),
            config=deepspeed_config(cfg, self.world)
        )
        self.step = 0
        self.total_steps = 0
        self._autocast_dtype = autocast_dtype(cfg.deepspeed.bf16, self.device)
        self._clip = cfg.deepspeed.gradient_clipping if cfg.deepspeed.zero_stage == 0 else 0.0
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._buffer_sync = BufferSync(self.model) if self.world > 1 else None
        # ZeRO 1/2 reduce gradients from hooks, bucketed in the order they fire; ranks whose
        # batches use different organs, experts or organ subsets fire different hooks in
        # different orders, and their collectives no longer match (a gloo size error, or worse,
        # misaligned sums). Such ranks backpropagate a fixed-order surrogate (_fixed_order).
        self._fixed_order = self.world > 1 and cfg.deepspeed.zero_stage > 0
        self._grad_seen: list[float] | None = None
        if self.world > 1 and cfg.deepspeed.zero_stage == 0:
            # DeepSpeed's stage-0 all-reduce gives a parameter without gradient a zero one (all
            # ranks must reduce the same tensors), and AdamW then decays a parameter that one
            # device would have skipped (an organ or expert nobody in the batch used). Flag
            # what got a gradient on any rank; the rest gets None again (_drop_unused_grads).
            seen = self._grad_seen = [0.0] * len(self._trainable)
            for i, p in enumerate(self._trainable):
                p.register_post_accumulate_grad_hook(lambda _p, i=i: seen.__setitem__(i, 1.0))
        # DINO freezes the head's prototypes during the first epoch(s) (``freeze_last_layer``):
        # moving them while the features are still random destabilises training.
        self._last_layer = list(self.model.student.head.last_layer.parameters())
        self._freeze_last = False
        if cfg.deepspeed.zero_stage > 0:
            # ZeRO 1/2 copy gradients out during backward; zero them at the source instead.
            for p in self._last_layer:
                p.register_hook(lambda g: torch.zeros_like(g) if self._freeze_last else g)
        dist = torch.distributed
        if cfg.deepspeed.zero_stage == 0 and dist.is_initialized() and dist.get_world_size() == 1:
            # A site trains at world size 1: DeepSpeed's gradient all-reduce is the identity there
            # but still walked every parameter after each backward (17 ms of a 100 ms step).
            self.engine.enable_backward_allreduce = False
        log.info("built PanFMSSL + DeepSpeed engine on %s in %.1f s", self.device, time.perf_counter() - t0)

    # ------------------------------------------------------------------ helpers

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _batches(self, loader: Iterable[SubjectBatch], what: str) -> Iterator[SubjectBatch]:
        for batch, _ in self._weighted_batches(loader, what):
            yield batch

    def _weighted_batches(self, loader: Iterable[SubjectBatch | RankShard],
                          what: str) -> Iterator[tuple[SubjectBatch, RankShard]]:
        """(batch on the device, its place in the global batch): the whole of it alone, the
        ``RankShard`` on a rank (``weight`` its share)."""
        n = 0
        for item in loader:
            # A rank must get its shard: a whole batch on every rank would count each subject N times.
            want = RankShard if self.world > 1 else SubjectBatch
            if not isinstance(item, want):
                raise TypeError(f"{what}: the loader yielded {type(item).__name__}, expected {want.__name__}"
                                + (" (a data-parallel rank: ShardedLoader)" if self.world > 1 else ""))
            place = item if isinstance(item, RankShard) else RankShard(item, 1.0, 0, item.size)
            n += 1
            yield place.batch.to(self.device), place
        if n == 0:
            raise ValueError(f"{what}: the loader yielded no batch (no subjects?)")

    def _base_optimizer(self) -> torch.optim.Optimizer:
        # ZeRO / mixed-precision wrappers keep the moments in the torch optimizer they wrap.
        opt: Any = self.optimizer
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"cannot find the torch optimizer inside {type(self.optimizer).__name__}")
        return opt

    def freeze_last_layer_steps(self, loader: Iterable[SubjectBatch] | Iterable[RankShard]) -> int:
        """Optimizer steps the head's last layer stays frozen: ``train.freeze_last_layer_epochs``
        epochs of ``loader``. The global step counts from the run's start (a federated site
        continues it across rounds), so "the first epoch" is the run's, not each round's."""
        epochs = self.cfg.train.freeze_last_layer_epochs
        if epochs == 0:
            return 0
        if not isinstance(loader, Sized):
            raise TypeError("fit: train.freeze_last_layer_epochs needs a loader with a length (batches per epoch)")
        return epochs * max(1, len(loader) // self.cfg.deepspeed.gradient_accumulation_steps)

    def _set_optim_hparams(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        loader: Iterable[SubjectBatch] | Iterable[RankShard],
        epochs: int,
        total_steps: int,
        global_saliency: torch.Tensor | None = None,
        on_step: StepCallback | None = None,
    ) -> FitResult:
        """Train ``epochs`` passes over ``loader``, continuing the schedules from the current step.

        Args:
            loader: yields :class:`SubjectBatch` (``make_loader``); re-iterated each epoch. On a
                data-parallel rank it yields that rank's :class:`RankShard` of each global batch
                (``ShardedLoader``), and the result, identical on every rank, is the site's.
            epochs: local epochs in this call.
            total_steps: optimizer steps of the whole run (all rounds); the schedules' horizon.
            global_saliency: (n_organs,) federation-wide saliency blended into the masker with
                ``cfg.train.masking.global_weight``; None keeps the masker local.
            on_step: optional ``fn(step, values)`` after each optimizer step, with the step's
                metrics and ``schedule/<name>`` values (used for TensorBoard). On a rank the
                metrics are its share (share x value); ``FitResult.history`` holds the sums.
        """
        if epochs < 1:
            raise ValueError(f"fit: epochs = {epochs} must be >= 1")
        sched = Schedules.for_config(self.cfg, total_steps)
        freeze_steps = self.freeze_last_layer_steps(loader)
        self.total_steps = total_steps
        model = self.model
        if global_saliency is not None:
            model.masker.set_global(global_saliency.detach().float().cpu(), self.cfg.train.masking.global_weight)
        model.masker.reset_metrics()
        model.train()
        t0 = time.perf_counter()
        # Per metric: the sum of (share of the global batch x value), and of the shares; alone
        # every share is 1, so the result is the plain mean over micro-steps.
        sums: dict[str, float] = {}
        shares: dict[str, float] = {}
        gate_mass: torch.Tensor | None = None
        holders: list[set[tuple[str, str]]] = [set() for _ in self.organs]
        seen: set[tuple[str, str]] = set()
        steps0 = self.step
        history: list[dict[str, float]] = []
        # The call's draws (views, masks, router noise) are keyed by (this seed, micro-step, a
        # subject's place in the global batch): one device draws what the ranks draw together
        # (fedpanfm/global_batch.py). The seed comes from torch's global RNG, which the caller
        # seeds per site and round (every rank alike).
        draw_seed = int(torch.randint(0, 1 << 62, (1,)).item())
        micro = 0
        for _ in tqdm(range(epochs), desc="local epochs", disable=not self.cfg.train.progress, leave=False):
            for batch, place in self._weighted_batches(loader, "fit"):
                weight = place.weight
                s = sched.at(self.step)
                self._set_optim_hparams(s["lr"], s["weight_decay"])
                self._freeze_last = self.step < freeze_steps
                before = self._buffer_sync.snapshot() if self._buffer_sync is not None else None
                part = GlobalBatch(size=place.size or batch.size, offset=place.offset, held=batch.size,
                                   count=batch.size if weight > 0 else 0, seed=draw_seed + micro, ranks=self.world)
                micro += 1
                with self._autocast(), global_batch(part):
                    out = self.engine(batch, {"teacher_temp": s["teacher_temp"], "noise_std": s["noise_std"]})
                if not torch.isfinite(out.loss.detach()):
                    raise FloatingPointError(f"fit: non-finite loss {out.loss.item()} at step {self.step}")
                scale = weight * self.world
                loss = out.loss if scale == 1.0 else out.loss * scale
                self.engine.backward(self._fixed_order_surrogate(loss) if self._fixed_order else loss)
                if self._buffer_sync is not None and before is not None:
                    self._buffer_sync.combine(before, weight)
                if self._freeze_last and self.cfg.deepspeed.zero_stage == 0:
                    # DINO's cancel_gradients_last_layer: no gradient, so AdamW skips the
                    # prototypes entirely (no moment, no decay) until they are released.
                    for p in self._last_layer:
                        p.grad = None
                boundary = self.engine.is_gradient_accumulation_boundary()
                if boundary and self._grad_seen is not None:
                    self._drop_unused_grads(self._grad_seen)
                if boundary and self._clip > 0:
                    torch.nn.utils.clip_grad_norm_(self._trainable, self._clip, foreach=True)
                self.engine.step()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + weight * float(v)
                    shares[k] = shares.get(k, 0.0) + weight
                gm = out.stats.gate_mass.detach().to("cpu", torch.float64)
                if weight == 0.0:
                    gm = torch.zeros_like(gm)  # a stand-in's routing is not the site's
                else:
                    self._count_subjects(batch, holders, seen)
                gate_mass = gm if gate_mass is None else gate_mass + gm
                if boundary:
                    with torch.no_grad():
                        model.update_teacher(s["teacher_momentum"])
                        model.update_directors(s["gema_momentum"])
                    values = {**{k: weight * float(v) for k, v in out.metrics.items()},
                              **{f"schedule/{k}": v for k, v in s.items()},
                              "schedule/last_layer_frozen": float(self._freeze_last)}
                    history.append(values)
                    if on_step is not None:
                        on_step(self.step, values)
                    self.step += 1
        assert gate_mass is not None  # _weighted_batches raises on an empty loader
        if self.world > 1:
            sums, shares, gate_mass, holders, seen, history = self._merge_ranks(
                sums, shares, gate_mass, holders, seen, history)
        metrics = {k: v / shares[k] for k, v in sums.items() if shares[k] > 0}
        metrics.update(model.masker.metrics())
        return FitResult(
            metrics=metrics,
            gate_mass=gate_mass,
            organ_subjects=torch.tensor([len(h) for h in holders], dtype=torch.int64),
            saliency=model.masker.local_estimate().detach().float().cpu(),
            subjects=len(seen),
            steps=self.step - steps0,
            seconds=time.perf_counter() - t0,
            history=history,
        )

    def _fixed_order_surrogate(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss whose gradient is ``loss``'s, reaching every trainable parameter in one order.

        The real backward runs as ``autograd.grad`` (no accumulation hooks fire); the surrogate
        ``sum_p <p, g_p>`` then hands each parameter exactly ``g_p`` (zero where ``loss`` does not
        reach it, which ZeRO would fill in anyway) through a graph that is the same on every rank.
        """
        grads = torch.autograd.grad(loss, self._trainable, allow_unused=True)
        return torch.stack([(p * (torch.zeros_like(p) if g is None else g)).sum()
                            for p, g in zip(self._trainable, grads)]).sum()

    def _drop_unused_grads(self, seen: list[float]) -> None:
        used = torch.tensor(seen, device=self.device)
        torch.distributed.all_reduce(used)
        for p, u in zip(self._trainable, used.tolist()):
            if not u:
                p.grad = None
        seen[:] = [0.0] * len(seen)

    @staticmethod
    def _merge_ranks(
        sums: dict[str, float], shares: dict[str, float], gate_mass: torch.Tensor,
        holders: list[set[tuple[str, str]]], seen: set[tuple[str, str]], history: list[dict[str, float]],
    ) -> tuple[dict[str, float], dict[str, float], torch.Tensor, list[set[tuple[str, str]]], set[tuple[str, str]],
               list[dict[str, float]]]:
        """The site's totals from every rank's (one collective per call): metric sums and shares
        and gate mass add up, subject sets unite, each step's weighted metrics add up (its
        ``schedule/*`` values are the same on every rank)."""
        parts = gather_objects((sums, shares, gate_mass, holders, seen, history))
        out_sums: dict[str, float] = {}
        out_shares: dict[str, float] = {}
        for p_sums, p_shares, *_ in parts:
            for k, v in p_sums.items():
                out_sums[k] = out_sums.get(k, 0.0) + v
                out_shares[k] = out_shares.get(k, 0.0) + p_shares[k]
        total_mass = sum((p[2] for p in parts[1:]), parts[0][2].clone())
        out_holders = [set().union(*(p[3][i] for p in parts)) for i in range(len(holders))]
        out_seen = set().union(*(p[4] for p in parts))
        out_history = []
        for i, step in enumerate(history):
            merged = dict(step)
            for p in parts[1:]:
                for k, v in p[5][i].items():
                    if not k.startswith("schedule/"):
                        merged[k] = merged.get(k, 0.0) + v
            out_history.append(merged)
        return out_sums, out_shares, total_mass, out_holders, out_seen, out_history

    def _count_subjects(self, batch: SubjectBatch, holders: list[set[tuple[str, str]]], seen: set[tuple[str, str]]) -> None:
        # Subject ids are unique only within a site; the pooled (centralized) loader mixes sites.
        sites = batch.sites or [""] * batch.size
        present = batch.present.cpu()
        for b, sid in enumerate(batch.subject_ids):
            key = (sites[b], sid)
            seen.add(key)
            for k in torch.nonzero(present[b]).flatten().tolist():
                holders[k].add(key)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[SubjectBatch]) -> dict[str, float]:
        """Mean SSL losses over ``loader`` with no update of any weight, centre or masker state.

        Runs in eval mode (no router noise) but with the same organ / patch masking as training,
        drawn from a generator seeded with ``cfg.seed`` so repeated evaluations over the same
        batches (an unshuffled loader) give the same masks; teacher temperature is
        ``cfg.train.teacher_temp_end``.
        """
        model = self.model
        # The forward updates buffers (teacher centres, saliency EMA, usage): restore them after.
        saved = {k: v.detach().clone() for k, v in model.named_buffers()}
        was_training = model.training
        model.eval()
        # The final teacher temperature, not the schedule's at self.step: the step held by a cached
        # trainer may be another site's, and evaluations must compare across rounds and sites.
        sched = {"teacher_temp": self.cfg.train.teacher_temp_end, "noise_std": 0.0}
        sums: dict[str, float] = {}
        n = 0
        try:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                for batch in self._batches(loader, "evaluate"):
                    with self._autocast():
                        out = model(batch, sched, gen)
                    for k, v in out.metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n += 1
        finally:
            for k, v in model.named_buffers():
                v.copy_(saved[k])
            model.train(was_training)
        return {k: v / n for k, v in sums.items()}

    # ------------------------------------------------------------------ state exchange

    def export_state(self) -> dict[str, torch.Tensor]:
        """The whole PanFMSSL state (student., teacher., dino_loss., ibot_loss., masker.) as
        detached, contiguous CPU tensors; floating tensors in fp32."""
        out: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            v = v.detach().to("cpu")
            out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``state`` into the model (cast to each tensor's dtype and device).

        Args:
            state: key -> tensor, keys as in :meth:`export_state`.
            strict: True requires every model key; False leaves keys absent from ``state`` as
                they are (e.g. a server that sends only the student). Unexpected keys and shape
                mismatches are errors either way.

        Raises:
            ValueError: naming the missing / unexpected keys or the key whose shape differs.
        """
        own = self.model.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state)) if strict else []
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
            raise ValueError(f"load_state: {'; '.join(parts)}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"load_state: key {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        self._resync_master_weights()

    def _resync_master_weights(self) -> None:
        # ZeRO 1/2 keep their own fp32 copy of the weights; refresh it from the module or the next
        # step would overwrite what was just loaded.
        restore = getattr(self.optimizer, "_restore_from_bit16_weights", None)
        if callable(restore):
            restore()

    def schedule_state(self) -> dict[str, int]:
        """The counters the schedules need to continue across calls: ``step``, ``total_steps``."""
        return {"step": self.step, "total_steps": self.total_steps}

    def set_schedule_state(self, state: dict[str, int]) -> None:
        """Restore counters from :meth:`schedule_state` (e.g. a site's step at a new round)."""
        if "step" not in state:
            raise ValueError(f"set_schedule_state: missing 'step' in {sorted(state)}")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"set_schedule_state: step = {step} must be >= 0")
        self.step = step
        self.total_steps = int(state.get("total_steps", self.total_steps))

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (and its step count, so bias correction restarts).

        Called by a site at the start of each round: the process may have served another site
        since, and moments from a different site's data (or from before the server replaced the
        weights) would push the new global weights in a stale direction. Per-site moments would
        need shipping optimizer state per site; we choose fresh moments each round (as FedAvg
        with a stateless local optimizer does).
        """
        self._base_optimizer().state.clear()
        self.engine.zero_grad()


_CACHE: dict[str, LocalTrainer] = {}


def trainer_key(cfg: ExperimentConfig) -> str:
    """Hash of every config part the built model + engine depend on.

    Model, deepspeed and the organ preprocessing define the engine; the micro-batch size, the
    train section (loss weights, masking policy read at build time), device and seed are part
    of what the built object holds, so they are in the key too.
    """
    d = cfg.to_dict()
    parts = {
        "model": d["model"],
        "deepspeed": d["deepspeed"],
        "organs": d["data"]["organs"],
        "extra_organs": d["data"]["extra_organs"],
        "batch_size": d["data"]["batch_size"],
        "train": d["train"],
        "device": d["device"],
        "seed": d["seed"],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def get_trainer(cfg: ExperimentConfig) -> LocalTrainer:
    """The process's trainer for ``cfg``, built on first use and reused afterwards."""
    key = trainer_key(cfg)
    trainer = _CACHE.get(key)
    if trainer is None:
        trainer = _CACHE[key] = LocalTrainer(cfg)
    return trainer


def clear_trainer_cache() -> None:
    """Drop cached trainers (tests; a process switching experiments)."""
    _CACHE.clear()


__all__ = ["FitResult", "LocalTrainer", "clear_trainer_cache", "deepspeed_config", "get_trainer", "param_groups", "trainer_key"]
