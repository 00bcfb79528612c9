"""Organ contrast: InfoNCE against an independent computation, and exact across data-parallel ranks."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpanfm.global_batch import GlobalBatch, global_batch
from fedpanfm.losses.organ_contrast import organ_contrast_loss

#: 5 queries over 4 keys; rank 0 holds queries 0-1 and keys 0-1, rank 1 the rest (unequal parts).
#: A positive is on its query's rank (the same subject), the negatives on both.
POSITIVE = [0, 1, 2, 2, 3]
QUERY_SPLIT, KEY_SPLIT = [(0, 2), (2, 5)], [(0, 2), (2, 4)]
#: The subjects behind the split (the loss weights follow the subject shares, as in the trainer).
SUBJECT_SPLIT, SUBJECTS = [(0, 1), (1, 3)], 3


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g), torch.tensor(POSITIVE)


def _numpy_infonce(q: np.ndarray, k: np.ndarray, pos: list[int], temperature: float) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses = []
    for i, p in enumerate(pos):
        s = k @ q[i] / temperature
        losses.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[p])
    return float(np.mean(losses))


def test_loss_matches_an_independent_infonce_and_is_scale_free() -> None:
    q, k, pos = _inputs()
    got = organ_contrast_loss(q, k, pos, 0.2)
    assert got.item() == pytest.approx(_numpy_infonce(q.numpy(), k.numpy(), POSITIVE, 0.2), rel=1e-5)
    # Cosine similarities: rescaling an embedding changes nothing.
    assert organ_contrast_loss(3.0 * q, 0.5 * k, pos, 0.2).item() == pytest.approx(got.item(), rel=1e-5)
    # Queries equal to their positive keys (and keys far apart) give a loss near 0.
    keys = torch.eye(4, 6)
    assert organ_contrast_loss(keys[pos], keys, pos, 0.05).item() < 1e-6


def test_gradient_reaches_queries_and_keys() -> None:
    q, k, pos = _inputs()
    q.requires_grad_(True)
    k.requires_grad_(True)
    organ_contrast_loss(q, k, pos, 0.2).backward()
    assert q.grad is not None and k.grad is not None
    assert bool((q.grad.abs().sum(1) > 0).all()) and bool((k.grad.abs().sum(1) > 0).all())


def test_no_queries_gives_an_attached_zero() -> None:
    _, k, _ = _inputs()
    k.requires_grad_(True)
    loss = organ_contrast_loss(torch.zeros(0, 6), k, torch.zeros(0, dtype=torch.long), 0.2)
    assert loss.item() == 0.0
    loss.backward()
    assert k.grad is not None and float(k.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(("pos", "match"), [([0, 1, 2, 2, 4], "outside"), ([0, 1], r"\(5,\)")])
def test_bad_input_is_named(pos: list[int], match: str) -> None:
    q, k, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        organ_contrast_loss(q, k, torch.tensor(pos), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        organ_contrast_loss(q, k, torch.tensor(POSITIVE), 0.0)


def _rank_main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        q, k, pos = _inputs()
        (q_lo, q_hi), (k_lo, k_hi), (s_lo, s_hi) = QUERY_SPLIT[rank], KEY_SPLIT[rank], SUBJECT_SPLIT[rank]
        q_part = q[q_lo:q_hi].clone().requires_grad_(True)
        k_part = k[k_lo:k_hi].clone().requires_grad_(True)
        part = GlobalBatch(size=SUBJECTS, offset=s_lo, held=s_hi - s_lo, count=s_hi - s_lo, seed=0, ranks=2)
        with global_batch(part):
            loss = organ_contrast_loss(q_part, k_part, pos[q_lo:q_hi] - k_lo, 0.2)
        # The trainer's weighting: a rank scales its loss by N n_r / n; DeepSpeed averages over N.
        (loss * 2 * part.share).backward()
        assert q_part.grad is not None and k_part.grad is not None
        torch.save({"loss": loss.item(), "share": part.share, "q": q_part.grad / 2, "k": k_part.grad / 2},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_loss_and_gradients(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), str(tmp_path / "grads")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    parts = [torch.load(tmp_path / f"grads.{r}") for r in range(2)]

    q, k, pos = _inputs()
    q.requires_grad_(True)
    k.requires_grad_(True)
    whole = organ_contrast_loss(q, k, pos, 0.2)
    whole.backward()
    assert q.grad is not None and k.grad is not None
    # The share-weighted losses of the ranks add up to the whole batch's mean.
    assert sum(p["share"] * p["loss"] for p in parts) == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), q.grad, rtol=1e-5, atol=1e-7)
    # Each key's gradient includes the other rank's queries, for which it is a negative.
    torch.testing.assert_close(torch.cat([p["k"] for p in parts]), k.grad, rtol=1e-5, atol=1e-7)
