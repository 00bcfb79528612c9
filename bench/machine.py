"""This machine's peaks, measured in the same run as the ratios that divide by them."""

from __future__ import annotations

import os
import time

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 10, threads: int = 0,
                cpu_time: bool = False) -> float:
    """Measured dense matmul FLOP/s (best of ``reps``) for ``n x n`` operands of ``dtype``.

    Args:
        dtype: operand precision.
        n: matrix size.
        reps: timed repetitions.
        threads: torch intra-op threads for the measurement (restored after); 0 = one per core
            (torch's default), the machine's peak.
        cpu_time: divide by this process's CPU seconds instead of wall seconds (FLOP per
            CPU-second: with one thread, one core's peak while the core is really ours).
    """
    clock = time.process_time if cpu_time else time.perf_counter
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = clock()
            a @ b
            best = min(best, clock() - t)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def machine_peak(dtype: torch.dtype = torch.float32) -> float:
    """The larger of the all-core and the one-thread matmul peak.

    On a loaded shared machine the all-core figure can fall below one thread's (a descheduled
    thread stalls every op); the machine's peak is the best either reaches.
    """
    return max(matmul_peak(dtype), matmul_peak(dtype, threads=1))


def default_threads() -> int:
    """What torch picks at start-up: one intra-op thread per available core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def copy_bandwidth(nbytes: int = 400 * 2**20, reps: int = 5, threads: int = 0) -> float:
    """Bytes copied per second by one large fp32 ``Tensor.copy_`` (best of ``reps``).

    Args:
        nbytes: size of the copied buffer; far beyond the caches, so this is memory bandwidth.
        reps: timed repetitions.
        threads: torch intra-op threads for the copy (restored after); 0 = one per core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return nbytes / best


def machine_copy(nbytes: int = 400 * 2**20, reps: int = 5) -> float:
    """The larger of the all-core and the one-thread copy bandwidth (as :func:`machine_peak`:
    under load a two-thread copy can fall far below one thread's, and the machine's copy is the
    best either reaches)."""
    return max(copy_bandwidth(nbytes, reps), copy_bandwidth(nbytes, reps, threads=1))
