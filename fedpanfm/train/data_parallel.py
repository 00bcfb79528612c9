"""One site, several devices: each rank's share of a step, and what the ranks agree on after it.

A site with N devices trains one global batch of ``data.batch_size`` subjects per micro-step,
split across N processes (``sites/multi_device.py`` starts them; DeepSpeed all-reduces the
gradients). Our design, so that the site's update is the world-size-1 update up to float
round-off wherever the step is a mean over subjects (docs/scale-out.md, "Multi-device sites"):

- **The same global batches.** Every rank walks the world-size-1 loader's batch sampler (same
  shuffle seed, same generator draws) and loads only its contiguous slice of each global batch
  (:class:`ShardedLoader`): the union over ranks is, batch by batch, what one device would see.
- **Weighted losses.** DeepSpeed averages the ranks' gradients; a rank holding ``n_r`` of the
  batch's ``n`` subjects scales its (per-subject mean) loss by ``N n_r / n``, which is 1 when the
  batch splits evenly, so the average is the gradient of the global batch's mean loss.
- **The same draws and batch statistics.** The trainer runs each forward inside a
  :func:`fedpanfm.global_batch.global_batch` context naming the rank's slice (``offset``, ``size``):
  random draws are keyed by a subject's place in the global batch, not by the rank, and the
  losses' batch statistics are reduced over the ranks.
- **Shared statistics.** The forward updates buffers from the rank's subjects (teacher centres,
  DEX usage, SGM saliency, counters). After every micro-step the ranks combine the changes
  (:class:`BufferSync`): ``old + sum_r c_r (new_r - old)`` with ``c_r = n_r / n`` for running
  means (an EMA of a batch mean stays exactly that) and ``c_r = 1`` for counters.

A batch with fewer subjects than ranks leaves a rank empty; it runs the batch's first subject as
a stand-in with weight 0 (its loss, statistics and counts are multiplied out), because every rank
must join every all-reduce.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from fedpanfm.data.batch import SubjectBatch

#: Buffers that count (subjects per organ, gate mass, masking counters): ranks add their
#: increments. Every other floating buffer is a running statistic of batch means.
SUMMED_BUFFERS = ("local_count", "gate_mass_acc", "stat_masked", "stat_present")


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-subject global batch that belong to ``rank`` of ``world``.

    Contiguous and as even as possible (sizes differ by at most one); ranks past ``n`` get none.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_bounds: rank {rank} outside world size {world}")
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class RankShard:
    """A rank's part of one global batch.

    Args:
        batch: the rank's subjects (a stand-in subject when it has none).
        weight: ``n_r / n``, the rank's share of the global batch; 0 for a stand-in.
        offset: index in the global batch of the rank's first subject (0 for a stand-in).
        size: ``n``, subjects of the global batch (0: the batch itself is the global batch).
    """

    batch: SubjectBatch
    weight: float
    offset: int = 0
    size: int = 0

    def loss_scale(self, world: int) -> float:
        """Multiplier of the rank's mean loss so the ranks' averaged gradient is the batch's."""
        return self.weight * world


class _RankBatchSampler:
    """Yields this rank's slice of each index list of a world-size-1 batch sampler."""

    def __init__(self, inner: Iterable[list[int]], rank: int, world: int,
                 places: deque[tuple[float, int, int]]) -> None:
        self.inner, self.rank, self.world, self.places = inner, rank, world, places

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.inner:
            indices = list(indices)
            lo, hi = shard_bounds(len(indices), self.rank, self.world)
            if hi > lo:
                self.places.append(((hi - lo) / len(indices), lo, len(indices)))
                yield indices[lo:hi]
            else:
                self.places.append((0.0, 0, len(indices)))
                yield indices[:1]

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class ShardedLoader:
    """This rank's view of a world-size-1 ``DataLoader``: yields a :class:`RankShard` per batch.

    Args:
        loader: the site's loader (``make_loader``); its dataset, collate function, workers and
            shuffle generator are reused, so the global batches are exactly that loader's.
        rank: this rank.
        world: the number of ranks.
    """

    def __init__(self, loader: DataLoader, rank: int, world: int) -> None:
        if loader.batch_sampler is None:
            raise TypeError("ShardedLoader: the loader has no batch sampler (batch_size=None)")
        shard_bounds(1, rank, world)  # checks rank / world
        self.loader, self.rank, self.world = loader, rank, world
        self.batch_sampler: Iterable[list[int]] = loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[RankShard]:
        places: deque[tuple[float, int, int]] = deque()
        inner = self.loader
        sampler = _RankBatchSampler(self.batch_sampler, self.rank, self.world, places)
        # The same generator object as the world-size-1 loader: its per-epoch draws (worker base
        # seed, then the shuffle) happen in the same order, so the permutations agree.
        rank_loader = DataLoader(inner.dataset, batch_sampler=sampler, num_workers=inner.num_workers,
                                 collate_fn=inner.collate_fn, generator=inner.generator,
                                 persistent_workers=False)
        for batch in rank_loader:
            # Batches arrive in sampler order (workers included), so the places line up.
            weight, offset, size = places.popleft()
            yield RankShard(batch, weight, offset, size)


class BufferSync:
    """Combines the ranks' buffer changes after each micro-step (see the module docstring).

    Integer buffers are constants of the architecture and are left alone.

    Args:
        model: the module whose buffers the forward updates.
    """

    def __init__(self, model: nn.Module) -> None:
        self.buffers: list[torch.Tensor] = []
        self.summed: list[bool] = []
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                self.buffers.append(buf)
                self.summed.append(name.rsplit(".", 1)[-1] in SUMMED_BUFFERS)

    def snapshot(self) -> list[torch.Tensor]:
        """The buffers before a micro-step."""
        return [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def combine(self, before: list[torch.Tensor], weight: float) -> None:
        """Replace every buffer by ``before + sum_r c_r (buffer_r - before)`` over the ranks.

        Args:
            before: :meth:`snapshot` taken before the micro-step (equal on every rank).
            weight: this rank's ``RankShard.weight``.
        """
        if not self.buffers:
            return
        active = 1.0 if weight > 0 else 0.0
        deltas = [((b.float() - b0.float()) * (active if s else weight)).flatten()
                  for b, b0, s in zip(self.buffers, before, self.summed)]
        flat = torch.cat(deltas)
        dist.all_reduce(flat)
        offset = 0
        for b, b0 in zip(self.buffers, before):
            n = b.numel()
            b.copy_((b0.float() + flat[offset:offset + n].view_as(b0)).to(b.dtype))
            offset += n


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a picklable value; used once per call, at its end)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["SUMMED_BUFFERS", "BufferSync", "RankShard", "ShardedLoader", "gather_objects", "shard_bounds"]
