"""The site's global batch: where this process's subjects sit in it, draws keyed by that place,
and the batch statistics taken over all of it.

A site with N devices splits each global batch of ``n`` subjects into N contiguous slices, one
per data-parallel rank (``fedpanfm/train/data_parallel.py``). For the ranks together to compute
what one device computes on the whole batch (our design, docs/scale-out.md, "Same update as one
device"), two things must not depend on the split:

- **Random draws.** Every draw of a step (organ subsets, augmentations, organ and patch masks,
  router noise) is made for the whole global batch from a generator seeded by (the step's seed,
  the draw's purpose), and each process keeps the rows of its own subjects
  (:class:`RowDraws`). One device keeps every row, so it draws exactly what the union of the
  ranks draws; a draw never depends on which rank a subject landed on.
- **Batch statistics** (Sinkhorn-Knopp sums, centres, the SGM saliency update, DEX usage and
  load balance, token-mean denominators) are summed over the ranks (:func:`all_sum`).

The trainer opens a :func:`global_batch` context around each micro-step's forward; outside one
(tests, evaluation, a caller's own generator) the draws and statistics are the process's own.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class GlobalBatch:
    """This process's part of one micro-step's global batch.

    Args:
        size: ``n``, subjects of the global batch.
        offset: index in the global batch of this process's first subject.
        held: rows of this process's batch (a stand-in subject counts: 1 row, ``count`` 0).
        count: subjects of the global batch held here (0 for a rank's weightless stand-in).
        seed: the micro-step's draw seed, the same on every rank.
        ranks: data-parallel ranks sharing the batch (1: statistics stay local).
    """

    size: int
    offset: int
    held: int
    count: int
    seed: int
    ranks: int = 1
    #: Router-noise draws made so far in this micro-step (they are keyed by call order).
    noise_calls: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.count <= self.held and self.held >= 1 and self.size >= 1 and self.ranks >= 1
                and 0 <= self.offset and self.offset + self.count <= self.size):
            raise ValueError(f"GlobalBatch: inconsistent part {self} of the global batch")
        if self.count not in (0, self.held):
            raise ValueError(f"GlobalBatch: {self.held} rows held but {self.count} subjects counted")

    @property
    def share(self) -> float:
        """``count / size``: this process's share of the global batch."""
        return self.count / self.size

    def slots(self, n_rows: int) -> Tensor:
        """(n_rows,) the global place of each row of a view-major stack of this process's batch.

        Row ``v * held + b`` (subject ``b`` here, view ``v``) is slot ``v * size + offset + b`` of
        the same stack of the global batch; a stand-in row is slot ``v * size`` (any slot would
        do: its weight is 0).
        """
        if n_rows % self.held:
            raise ValueError(f"GlobalBatch: {n_rows} rows are not a stack of {self.held}-row views")
        rows = torch.arange(n_rows)
        return rows // self.held * self.size + self.offset + rows % self.held


_ACTIVE: ContextVar[GlobalBatch | None] = ContextVar("fedpanfm_global_batch", default=None)


@contextlib.contextmanager
def global_batch(part: GlobalBatch) -> Iterator[GlobalBatch]:
    """Make ``part`` the current global batch for the draws and statistics inside the block."""
    token = _ACTIVE.set(part)
    try:
        yield part
    finally:
        _ACTIVE.reset(token)


def current() -> GlobalBatch | None:
    """The global batch of the running micro-step, or None outside :func:`global_batch`."""
    return _ACTIVE.get()


def _seed(seed: int, purpose: str) -> int:
    # A stable hash (Python's str hash differs per process), 63 bits for manual_seed.
    digest = hashlib.blake2b(f"{seed}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RowDraws:
    """Random numbers for some rows of a view-major stack, keyed by their global places.

    Each call draws one tensor for every slot of the global stack from the purpose's own
    generator, and returns the requested rows: the draws of a row do not depend on which process
    holds it. Successive calls continue the same generator, so a consumer must make the same
    calls with the same per-row shapes on every rank (they depend on the config only).

    Args:
        part: the current global batch.
        purpose: names the draw (e.g. ``"views/local/subsets"``); different purposes are independent.
        rows: (m,) rows of the stack the numbers are for.
        n_rows: rows of the whole stack held here (``views x held``).
    """

    def __init__(self, part: GlobalBatch, purpose: str, rows: Tensor, n_rows: int) -> None:
        self.slots = part.slots(n_rows)[rows.cpu()]
        self.n_slots = n_rows // part.held * part.size
        self.generator = torch.Generator().manual_seed(_seed(part.seed, purpose))

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(m, *shape) uniform in [0, 1), on the CPU."""
        return torch.rand((self.n_slots, *shape), generator=self.generator, dtype=dtype)[self.slots]

    def randn(self, *shape: int) -> Tensor:
        """(m, *shape) standard normal, on the CPU."""
        return torch.randn((self.n_slots, *shape), generator=self.generator)[self.slots]

    def randint(self, high: int) -> Tensor:
        """(m,) integers in [0, high), from one uniform draw per row."""
        return (self.rand() * high).long().clamp(max=high - 1)


class GeneratorDraws:
    """:class:`RowDraws`' interface over a caller's generator (None: torch's global RNG), ``m`` rows.

    Each call is the plain ``torch.rand`` / ``randn`` / ``randint`` of ``(m, *shape)`` on the
    generator, so callers that pass a generator get the numbers they always got.
    """

    def __init__(self, rows: int, generator: torch.Generator | None) -> None:
        self.rows = rows
        self.generator = generator

    def __len__(self) -> int:
        return self.rows

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.rand((self.rows, *shape), generator=self.generator, dtype=dtype)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn((self.rows, *shape), generator=self.generator)

    def randint(self, high: int) -> Tensor:
        return torch.randint(0, high, (self.rows,), generator=self.generator)


#: Random numbers for the rows of a stack: keyed by their global places, or a generator's.
Draws = RowDraws | GeneratorDraws


def row_draws(purpose: str, rows: Tensor, n_rows: int) -> RowDraws | None:
    """:class:`RowDraws` for ``rows`` of an ``n_rows`` stack in the current global batch; None outside one."""
    part = current()
    return None if part is None else RowDraws(part, purpose, rows, n_rows)


def draws_for(purpose: str, rows: Tensor, n_rows: int, generator: torch.Generator | None) -> Draws:
    """The draws for ``rows`` of an ``n_rows`` stack: keyed (:func:`row_draws`) when no generator is
    given inside a training micro-step, else the generator's (or the global RNG's)."""
    keyed = row_draws(purpose, rows, n_rows) if generator is None else None
    return keyed if keyed is not None else GeneratorDraws(len(rows), generator)


def sharing() -> GlobalBatch | None:
    """The current global batch when it is shared by several ranks (statistics are reduced)."""
    part = current()
    return part if part is not None and part.ranks > 1 else None


def all_sum(x: Tensor) -> Tensor:
    """``x`` summed over the ranks sharing the global batch (a new tensor); ``x`` itself alone.

    A rank's weightless stand-in contributes zeros. No gradient flows through the sum.
    """
    part = sharing()
    if part is None:
        return x
    y = x.detach().clone() if part.count > 0 else torch.zeros_like(x)
    dist.all_reduce(y)
    return y


def all_logsumexp(x: Tensor, dim: int = 0) -> Tensor:
    """``logsumexp`` of ``x`` along ``dim`` over the rows of every rank sharing the global batch."""
    part = sharing()
    local = torch.logsumexp(x, dim=dim)
    if part is None:
        return local
    # One row per rank (the others zero) summed: an all-gather that gloo and NCCL both do as an
    # all-reduce; an empty or stand-in part gives -inf, which adds nothing to the logsumexp.
    if part.count == 0:
        local = torch.full_like(local, -torch.inf)
    rows = torch.zeros((dist.get_world_size(), *local.shape), dtype=local.dtype, device=local.device)
    rows[dist.get_rank()] = local.detach()
    dist.all_reduce(rows)
    return torch.logsumexp(rows, dim=0)


class _GatherRows(torch.autograd.Function):
    """Rows of every rank, concatenated in rank order; the backward returns each rank the
    gradient of the SUM of all ranks' losses with respect to its own rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], start: int) -> Tensor:
        ctx.start, ctx.n = start, x.shape[0]
        # Ranks hold different numbers of rows: each fills its own slot of a zero buffer and an
        # all-reduce (which gloo and NCCL both have) assembles the gather.
        buf = x.new_zeros((len(sizes), max(sizes), *x.shape[1:]))
        buf[dist.get_rank(), : x.shape[0]] = x
        dist.all_reduce(buf)
        return torch.cat([buf[r, : sizes[r]] for r in range(len(sizes))])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start: ctx.start + ctx.n], None, None


def all_gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """The rows of ``x`` of every rank sharing the global batch, in rank order, with gradient;
    and the index of this rank's first row among them. Alone: ``(x, 0)``.

    The gradient is exact for losses that are sums over the ranks: each rank's own rows receive
    the gradient of every rank's loss terms that used them (DeepSpeed's gradient average then
    equals one device's gradient, as for the other losses; fedpanfm/train/data_parallel.py). A
    rank's weightless stand-in contributes no rows.
    """
    part = sharing()
    if part is None:
        return x, 0
    n = x.shape[0] if part.count > 0 else 0
    counts = torch.zeros(dist.get_world_size(), device=x.device)
    counts[dist.get_rank()] = n
    sizes = [int(c) for c in all_sum(counts).tolist()]
    offset = sum(sizes[: dist.get_rank()])
    return _GatherRows.apply(x[:n], sizes, offset), offset


def mean_denominator(count: Tensor) -> Tensor:
    """The denominator that makes a rank's sum over ``count`` items a share of the global mean.

    A loss that is a mean over items (tokens, rows) rather than over subjects: the rank divides
    its sum by ``share x (items over all ranks)``, so the trainer's share-weighted average of the
    ranks' losses (and gradients) is the global batch's sum over all its items. Alone: ``count``.
    """
    part = sharing()
    if part is None:
        return count
    total = all_sum(count.float())  # every rank joins the collective, a stand-in too
    return total * part.share if part.count > 0 else count


__all__ = ["Draws", "GeneratorDraws", "GlobalBatch", "RowDraws", "all_gather_rows", "all_logsumexp", "all_sum", "current",
           "draws_for", "global_batch", "mean_denominator", "row_draws", "sharing"]
