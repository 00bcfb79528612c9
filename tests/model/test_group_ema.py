"""Group EMA of a director from its experts: the formula by hand, and the error cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpanfm.model.group_ema import group_ema, group_ema_module_


def test_group_ema_matches_hand_computation():
    director = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    experts = [
        {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0])},
        {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([2.0])},
        {"w": torch.tensor([6.0, 6.0]), "b": torch.tensor([3.0])},
    ]
    # weights 1:1:2 -> shares 0.25, 0.25, 0.5; m = 0.9
    out = group_ema(director, experts, torch.tensor([1.0, 1.0, 2.0]), 0.9)
    # mean w = 0.25*[3,0] + 0.25*[0,4] + 0.5*[6,6] = [3.75, 4.0]; 0.9*[1,2] + 0.1*[3.75,4] = [1.275, 2.2]
    assert torch.allclose(out["w"], torch.tensor([1.275, 2.2]))
    # mean b = 0.25 + 0.5 + 1.5 = 2.25; 0.9*0 + 0.1*2.25
    assert torch.allclose(out["b"], torch.tensor([0.225]))
    assert torch.equal(director["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_momentum_extremes():
    d = {"w": torch.tensor([1.0])}
    es = [{"w": torch.tensor([5.0])}, {"w": torch.tensor([7.0])}]
    assert group_ema(d, es, torch.tensor([1.0, 0.0]), 1.0)["w"].item() == 1.0
    assert group_ema(d, es, torch.tensor([0.0, 3.0]), 0.0)["w"].item() == 7.0


def test_module_variant_equals_dict_variant():
    torch.manual_seed(0)
    director = nn.Linear(3, 2)
    experts = [nn.Linear(3, 2) for _ in range(3)]
    w = torch.tensor([0.2, 0.0, 0.6])
    want = group_ema(dict(director.state_dict()), [dict(e.state_dict()) for e in experts], w, 0.7)
    used = group_ema_module_(director, experts, w, 0.7)
    assert torch.allclose(used, torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    for k, v in director.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6)


def test_bf16_director_keeps_fp32_accumulation():
    d = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    es = [{"w": torch.tensor([3.0], dtype=torch.bfloat16)}]
    out = group_ema(d, es, torch.tensor([1.0]), 0.5)
    assert out["w"].dtype == torch.bfloat16 and out["w"].item() == 2.0


@pytest.mark.parametrize(
    "weights, message",
    [
        (torch.tensor([1.0, -1.0]), ">= 0"),
        (torch.tensor([0.0, 0.0]), "all expert weights are zero"),
        (torch.tensor([1.0]), "1 weights for 2 experts"),
        (torch.tensor([float("nan"), 1.0]), "finite"),
    ],
)
def test_bad_weights_raise(weights, message):
    d = {"w": torch.zeros(2)}
    es = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(ValueError, match=message):
        group_ema(d, es, weights, 0.9)


def test_key_and_shape_mismatch_name_the_key():
    d = {"fc1.weight": torch.zeros(2), "fc2.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match="fc2.bias"):
        group_ema(d, [{"fc1.weight": torch.zeros(2)}], torch.ones(1), 0.9)
    with pytest.raises(ValueError, match="'fc1.weight'.*shape"):
        group_ema(d, [{"fc1.weight": torch.zeros(3), "fc2.bias": torch.zeros(1)}], torch.ones(1), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        group_ema(d, [dict(d)], torch.ones(1), 1.5)
