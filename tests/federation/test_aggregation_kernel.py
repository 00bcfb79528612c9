"""The blocked weighted-mean kernel against an independent float64 numpy reference, and its
error bound (float32 runs of at most ``_FP32_RUN`` sites, combined in float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpanfm.federation.means import _FP32_RUN, _MEAN_BLOCK, weighted_mean


def _reference(ts: list[torch.Tensor], w: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(exact-ish float64 mean, float64 sum_i |w_i t_i| / sum_i w_i) with numpy."""
    x = np.stack([t.double().numpy() for t in ts])
    wn = np.asarray(w, dtype=np.float64) / np.sum(w)
    return (wn[:, None] * x).sum(0), (wn[:, None] * np.abs(x)).sum(0)


@pytest.mark.parametrize("sites", [1, 3, 8, _FP32_RUN + 1, 3 * _FP32_RUN + 5])
def test_mean_within_the_run_bound_of_a_float64_reference(sites: int) -> None:
    g = torch.Generator().manual_seed(sites)
    n = 2 * _MEAN_BLOCK + 17  # several blocks and a remainder
    # Sites near a common value with opposite-signed offsets: cancellation, like real weights.
    base = torch.randn(n, generator=g) * 0.05
    ts = [base + 0.01 * torch.randn(n, generator=g) for _ in range(sites)]
    w = [float(x) for x in torch.randint(1, 50, (sites,), generator=g)]
    ref, mag = _reference(ts, w)
    out = weighted_mean(ts, w)
    assert out is not None and out.dtype == torch.float32 and out.shape == (n,)
    err = np.abs(out.double().numpy() - ref)
    # float32 run of <= _FP32_RUN adds, float64 combine, final float32 rounding.
    bound = (min(sites, _FP32_RUN) + 1) * 2.0**-24 * mag + 2.0**-24 * np.abs(ref)
    assert (err <= bound).all(), float((err / bound).max())
    # The error does not grow with the federation beyond one run's worth.
    assert float(err.max()) < 1e-7


def test_many_sites_keep_float64_combine_accuracy() -> None:
    # 256 equal sites of 1 + 2^-18: partial sums of up to 16 of them are exact in float32, so
    # the float64 combine of 16-site runs gives the mean exactly; one float32 run over all 256
    # sites is off by 2.9e-6 (checked here too, so the test can tell the two apart).
    n, sites = 1000, 256
    x = torch.full((n,), 1.0 + 2.0**-18)
    out = weighted_mean([x] * sites, [1.0] * sites)
    assert out is not None and torch.equal(out, x)
    naive = torch.zeros(n)
    for _ in range(sites):
        naive.add_(x, alpha=1.0 / sites)
    assert float((naive - x).abs().max()) > 1e-6


def test_integer_and_bf16_inputs() -> None:
    big = 2**40 + 3  # beyond float32's integer range: the integer path accumulates in float64
    ints = weighted_mean([torch.tensor([big, 1]), torch.tensor([big + 2, 4])], [1.0, 1.0])
    assert ints is not None and ints.dtype == torch.int64 and ints.tolist() == [big + 1, 2]  # 2.5 -> 2 (half even)
    a = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    b = torch.tensor([2.0, 5.0], dtype=torch.bfloat16)
    m = weighted_mean([a, b], [1.0, 3.0])
    assert m is not None and m.dtype == torch.bfloat16 and m.float().tolist() == [1.75, 4.5]

