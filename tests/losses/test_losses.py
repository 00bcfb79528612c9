"""DINO / iBOT / DEX-distillation / balance losses against hand computations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fedpanfm.losses.balance import load_balance_loss, switch_balance
from fedpanfm.losses.dex_distill import depth_weights, dex_distill_loss
from fedpanfm.losses.dino_cls import DINOClsLoss
from fedpanfm.losses.ibot_patch import IBOTPatchLoss


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _ce(teacher: list[float], student: list[float], center: list[float], tt: float, ts: float) -> float:
    t = _softmax([(a - c) / tt for a, c in zip(teacher, center)])
    s = _softmax([a / ts for a in student])
    return -sum(ti * math.log(si) for ti, si in zip(t, s))


def test_dino_loss_matches_hand_computation_two_subjects_three_prototypes() -> None:
    loss = DINOClsLoss(out_dim=3, student_temp=0.5, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[0.1, -0.2, 0.3]]))
    s = [[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]]
    t = [[0.5, 0.1, 0.0], [-0.3, 0.9, 0.2]]
    got = loss(torch.tensor(s), torch.tensor(t), teacher_temp=0.25)
    c = [0.1, -0.2, 0.3]
    want = (_ce(t[0], s[0], c, 0.25, 0.5) + _ce(t[1], s[1], c, 0.25, 0.5)) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dino_gradient_reaches_student_only_and_center_is_ema() -> None:
    loss = DINOClsLoss(out_dim=3, student_temp=0.1, center_momentum=0.9)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    loss(s, t, 0.04).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    loss.update_center(t)
    assert torch.allclose(loss.center, 0.1 * t.detach().mean(0, keepdim=True))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        loss(torch.randn(4, 5), torch.randn(4, 5), 0.04)


def test_ibot_averages_per_subject_then_over_subjects() -> None:
    loss = IBOTPatchLoss(out_dim=4, student_temp=0.1, center_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    rows = torch.tensor([0, 0, 0, 0, 2])  # subject 0 has 4 masked tokens, subject 2 has 1
    per = loss.row_losses(s, t, 0.04)
    want = (per[:4].mean() + per[4]) / 2
    assert loss(s, t, rows, 0.04).item() == pytest.approx(want.item(), rel=1e-6)
    # and it is not the plain token mean
    assert abs(want.item() - per.mean().item()) > 1e-4


def test_ibot_empty_mask_gives_zero_attached_loss() -> None:
    loss = IBOTPatchLoss(out_dim=4, student_temp=0.1, center_momentum=0.9)
    s = torch.zeros(0, 4, requires_grad=True)
    out = loss(s, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.04)
    assert out.item() == 0.0 and out.requires_grad
    loss.update_center(torch.zeros(0, 4))
    assert torch.equal(loss.center, torch.zeros(1, 4))


@dataclass
class _Aux:
    gates: torch.Tensor
    probs: torch.Tensor
    topk: torch.Tensor
    expert_out: torch.Tensor
    director_out: torch.Tensor | None
    pad: torch.Tensor


def _aux(probs: torch.Tensor, topk: torch.Tensor, expert: torch.Tensor, director: torch.Tensor | None, pad: torch.Tensor) -> _Aux:
    return _Aux(probs, probs, topk, expert, director, pad)


def test_balance_is_one_when_balanced_and_larger_when_collapsed() -> None:
    e, b = 4, 8
    probs = torch.full((b, e), 1.0 / e)
    topk = torch.stack([torch.arange(b) % e, (torch.arange(b) + 1) % e], dim=1)
    assert switch_balance(probs, topk).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(b, 1)
    collapsed_topk = torch.tensor([[0, 1]]).repeat(b, 1)
    # f = (0.5, 0.5, 0, 0), P = (0.97, 0.01, ..) -> 4 * (0.485 + 0.005)
    assert switch_balance(collapsed_probs, collapsed_topk).item() == pytest.approx(4 * 0.49, rel=1e-5)
    pad = torch.zeros(b, 3, dtype=torch.bool)
    x = torch.zeros(b, 3, 2)
    layers = [_aux(probs, topk, x, x, pad), None, _aux(collapsed_probs, collapsed_topk, x, x, pad)]
    assert load_balance_loss(layers).item() == pytest.approx((1.0 + 4 * 0.49) / 2, rel=1e-5)
    assert load_balance_loss([None, None]) is None


def test_dex_distill_depth_weights_and_padding() -> None:
    assert depth_weights([0, 1, 3]) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    g = torch.Generator().manual_seed(1)
    b, t, d = 2, 3, 5
    pad = torch.tensor([[False, False, True], [False, False, False]])
    probs, topk = torch.full((b, 2), 0.5), torch.tensor([[0, 1], [1, 0]])
    layers = []
    for _ in range(2):
        ex = torch.randn(b, t, d, generator=g, requires_grad=True)
        di = torch.randn(b, t, d, generator=g, requires_grad=True)
        layers.append(_aux(probs, topk, ex, di, pad))
    got = dex_distill_loss([layers[0], None, layers[1]], temperature=0.5)

    def layer_ce(a: _Aux) -> float:
        vals = []
        for i in range(b):
            for j in range(t):
                if pad[i, j]:
                    continue
                tt = _softmax((a.director_out[i, j] / 0.5).tolist())
                ss = _softmax((a.expert_out[i, j] / 0.5).tolist())
                vals.append(-sum(x * math.log(y) for x, y in zip(tt, ss)))
        return sum(vals) / len(vals)

    want = 1 / 4 * layer_ce(layers[0]) + 3 / 4 * layer_ce(layers[1])  # blocks 0 and 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert layers[0].expert_out.grad is not None and layers[0].director_out.grad is None
    # padded token gets no gradient
    assert layers[0].expert_out.grad[0, 2].abs().sum() == 0


def test_dex_distill_has_zero_gradient_when_experts_equal_director() -> None:
    x = torch.randn(2, 3, 4)
    ex = x.clone().requires_grad_(True)
    aux = _aux(torch.full((2, 2), 0.5), torch.tensor([[0, 1], [0, 1]]), ex, x, torch.zeros(2, 3, dtype=torch.bool))
    dex_distill_loss([aux], temperature=0.5).backward()
    assert ex.grad.abs().max() < 1e-6


def test_koleo_hand_computed_and_spreads_points() -> None:
    from fedpanfm.losses.koleo import koleo_loss

    # Unit vectors at 0, 90 and 180 degrees (scaled: the loss normalises): every nearest
    # neighbour is at 90 degrees, distance sqrt(2).
    x = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)
    assert koleo_loss(x[:1]) is None
    # A gradient step on the loss pushes the two close points apart.
    y = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    before = torch.nn.functional.normalize(y.detach(), dim=-1)
    koleo_loss(y).backward()
    with torch.no_grad():
        y -= 0.05 * y.grad
    after = torch.nn.functional.normalize(y.detach(), dim=-1)
    assert (after[0] - after[1]).norm() > (before[0] - before[1]).norm()


def _dino_reference(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                    ncrops: int, student_temp: float, temp: float) -> torch.Tensor:
    """facebookresearch/dino ``DINOLoss.forward`` (main_dino.py), transcribed: crops are chunks
    of the batch dimension, the teacher's two global crops come first."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = torch.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


@pytest.mark.parametrize("n_views", [2, 4])
def test_cross_view_matches_dino_multicrop_reference(n_views: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, k = 3, 5
    loss = DINOClsLoss(out_dim=k, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, k, generator=g))
    s = torch.randn(n_views, b, k, generator=g)
    t = torch.randn(2, b, k, generator=g)
    got = loss.cross_view(s, t, teacher_temp=0.04)
    want = _dino_reference(s.reshape(-1, k), t.reshape(-1, k), loss.center, n_views, 0.1, 0.04)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # and by hand with the scalar cross-entropy: pairs (g, v), v != g only
    c = loss.center[0].tolist()
    terms = [sum(_ce(t[gv, i].tolist(), s[v, i].tolist(), c, 0.04, 0.1) for i in range(b)) / b
             for gv in range(2) for v in range(n_views) if v != gv]
    assert len(terms) == 2 * n_views - 2
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_cross_view_never_pairs_a_view_with_itself() -> None:
    g = torch.Generator().manual_seed(1)
    loss = DINOClsLoss(out_dim=4, student_temp=0.1, center_momentum=0.9)
    s = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 2, 4, generator=g)
    loss.cross_view(s, t, 0.04).backward()
    grad0 = s.grad[0].clone()
    # Student view 0 is supervised by teacher view 1 only: changing teacher view 0 leaves its gradient.
    s.grad = None
    t2 = t.clone()
    t2[0] = torch.randn(2, 4, generator=g) * 5
    loss.cross_view(s, t2, 0.04).backward()
    assert torch.allclose(s.grad[0], grad0)
    assert not torch.allclose(s.grad[2], torch.zeros_like(s.grad[2]))
    # and the same-view pair is absent from the value: a student view 0 equal to the teacher's
    # view 0 scores exactly as the pairs (1 -> 0), (0 -> 2), (1 -> 2) say
    same = torch.cat([t, torch.randn(1, 2, 4, generator=g)])
    pairs = [(1, 0), (0, 2), (1, 2)]
    want = sum(loss.row_losses(same[v], t[gv], 0.04).mean() for gv, v in pairs) / 3
    # (0 -> 1) is a pair too: student view 1 = teacher view 1
    want = (want * 3 + loss.row_losses(same[1], t[0], 0.04).mean()) / 4
    assert loss.cross_view(same, t, 0.04).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 <= G <= V"):
        loss.cross_view(torch.randn(1, 2, 4), torch.randn(2, 2, 4), 0.04)


def test_patchify_order_matches_the_tokenizer_and_mae_mse() -> None:
    from fedpanfm.losses.mae import masked_patch_mse, patchify

    g = torch.Generator().manual_seed(2)
    x2 = torch.randn(2, 1, 4, 6, generator=g)
    p2 = patchify(x2, (2, 3))
    assert p2.shape == (2, 4, 6)
    # patch (row 1, col 0) of image 1 = pixels [2:4, 0:3], flattened row-major
    assert torch.equal(p2[1, 2], x2[1, 0, 2:4, 0:3].reshape(-1))
    x3 = torch.randn(1, 1, 4, 4, 4, generator=g)
    p3 = patchify(x3, (2, 2, 2))
    assert torch.equal(p3[0, 5], x3[0, 0, 2:4, 0:2, 2:4].reshape(-1))  # patch grid index (1, 0, 1)
    # a stride-equal convolution with a one-hot kernel reads the same order
    conv = torch.nn.Conv2d(1, 6, kernel_size=(2, 3), stride=(2, 3), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(6).view(6, 1, 2, 3))
    assert torch.allclose(conv(x2).flatten(2).transpose(1, 2), p2, atol=1e-6)
    target = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    pred = torch.tensor([[-1.0, 1.0], [0.5, 0.0]])
    # per-patch normalised targets: [-1, 1] and (flat) [0, 0]; errors 0 and 0.25
    assert masked_patch_mse(pred, target).item() == pytest.approx(0.25 / 4, rel=1e-4)
    assert masked_patch_mse(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2)).requires_grad


def _dinov2_sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` (one process), written out in the exp domain."""
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_knopp_targets_match_dinov2_and_balance_prototypes() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.rand(12, 5, generator=gen) * 2 - 1  # cosines, as the head gives
    loss = DINOClsLoss(5, 0.1, 0.9, centering="sinkhorn_knopp")
    q = loss.teacher_probs(logits, 0.2)
    torch.testing.assert_close(q.double(), _dinov2_sinkhorn_knopp(logits, 0.2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each row a distribution
    # Three iterations move the batch towards equipartition over prototypes (12 / 5 rows each).
    plain = torch.softmax(logits / 0.2, dim=-1)
    assert (q.sum(dim=0) - 12 / 5).abs().max() < 0.5 * (plain.sum(dim=0) - 12 / 5).abs().max()


def test_sinkhorn_knopp_is_finite_for_sharp_temperatures_and_cross_view_uses_it() -> None:
    logits = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0]])
    q = DINOClsLoss(3, 0.1, 0.9, centering="sinkhorn_knopp").teacher_probs(logits, 0.01)  # exp(100) overflows
    assert torch.isfinite(q).all()
    loss = DINOClsLoss(3, 0.1, 0.9, centering="sinkhorn_knopp")
    student = torch.randn(3, 2, 3)
    teacher = torch.randn(2, 2, 3)
    t = loss.teacher_probs(teacher, 0.04)
    want = torch.stack([-(t[g] * torch.log_softmax(student[v] / 0.1, -1)).sum(-1).mean()
                        for g in range(2) for v in range(3) if v != g]).mean()
    torch.testing.assert_close(loss.cross_view(student, teacher, 0.04), want)
    with pytest.raises(ValueError, match="centering"):
        DINOClsLoss(3, 0.1, 0.9, centering="batchnorm")
