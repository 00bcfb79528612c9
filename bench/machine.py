"""This machine's peaks, measured in the same run as the ratios that divide by them."""

from __future__ import annotations

import time

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s (best of ``reps``) for ``n x n`` operands of ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def copy_bandwidth(nbytes: int = 400 * 2**20, reps: int = 5) -> float:
    """Bytes copied per second by one large fp32 ``Tensor.copy_`` (best of ``reps``).

    Args:
        nbytes: size of the copied buffer; far beyond the caches, so this is memory bandwidth.
        reps: timed repetitions.
    """
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best
