"""DEX layers: image-wise routing, gates, director invariants, usage-aware noise, group EMA."""

from __future__ import annotations

import torch
from conftest import tiny_config

from fedpanfm.config import DexConfig
from fedpanfm.model.dex import DEXLayer, PlainMLP


def make_layer(experts: int = 4, top_k: int = 2, noise: float = 0.0, seed: int = 0) -> DEXLayer:
    torch.manual_seed(seed)
    return DEXLayer(16, 32, DexConfig(experts=experts, top_k=top_k, noise_std=noise))


def test_experts_start_as_copies_of_director_which_gets_no_grad():
    layer = make_layer()
    d = layer.director.state_dict()
    for e in layer.experts:
        for k, v in e.state_dict().items():
            assert torch.equal(v, d[k]) and v.data_ptr() != d[k].data_ptr()
    assert not any(p.requires_grad for p in layer.director.parameters())
    layer.train()
    x = torch.randn(3, 5, 16)
    y, aux = layer(x, torch.zeros(3, 5, dtype=torch.bool))
    assert aux.director_out is not None and not aux.director_out.requires_grad
    (y.sum() + aux.director_out.sum()).backward()
    assert all(p.grad is None for p in layer.director.parameters())
    assert layer.router.weight.grad is not None


def test_gates_topk_and_output_equal_per_image_mixture():
    layer = make_layer(experts=4, top_k=2).eval()
    x = torch.randn(5, 6, 16)
    y, aux = layer(x, torch.zeros(5, 6, dtype=torch.bool))
    assert torch.allclose(aux.gates.sum(-1), torch.ones(5))
    assert ((aux.gates > 0).sum(-1) == 2).all()
    assert torch.allclose(aux.probs.sum(-1), torch.ones(5))
    logits = layer.router(x[:, 0]) / layer.temperature
    assert torch.allclose(aux.probs, logits.softmax(-1), atol=1e-6)
    # independent reference: every image through its own experts, whole image at once
    for b in range(5):
        e1, e2 = aux.topk[b].tolist()
        p1, p2 = aux.probs[b, e1], aux.probs[b, e2]
        want = (p1 * layer.experts[e1](x[b]) + p2 * layer.experts[e2](x[b])) / (p1 + p2)
        assert torch.allclose(y[b], want, atol=1e-6)
    assert aux.director_out is None  # eval: no distillation target computed


def test_routing_is_per_image():
    """Changing a non-CLS token never changes the routing; changing the CLS token can."""
    layer = make_layer().eval()
    x = torch.randn(4, 6, 16)
    pad = torch.zeros(4, 6, dtype=torch.bool)
    _, a = layer(x, pad)
    x2 = x.clone()
    x2[:, 1:] = torch.randn(4, 5, 16) * 10
    _, b = layer(x2, pad)
    assert torch.equal(a.gates, b.gates)
    x3 = x.clone()
    x3[:, 0] = torch.randn(4, 16) * 10
    _, c = layer(x3, pad)
    assert not torch.equal(a.gates, c.gates)


def test_gate_mass_and_usage_accumulate_in_training_only():
    layer = make_layer()
    pad = torch.zeros(3, 4, dtype=torch.bool)
    layer.eval()
    layer(torch.randn(3, 4, 16), pad)
    assert layer.gate_mass_acc.sum() == 0
    layer.train()
    _, a1 = layer(torch.randn(3, 4, 16), pad)
    _, a2 = layer(torch.randn(3, 4, 16), pad)
    assert torch.allclose(layer.pending_gate_mass(), a1.gate_mass() + a2.gate_mass())
    assert torch.isclose(layer.gate_mass_acc.sum(), torch.tensor(6.0))
    share1 = a1.gate_mass() / 3
    share2 = a2.gate_mass() / 3
    u = 0.99 * (0.99 * torch.full((4,), 0.25) + 0.01 * share1) + 0.01 * share2
    assert torch.allclose(layer.usage, u, atol=1e-6)


def test_usage_aware_noise_favours_rarely_used_expert():
    layer = make_layer(experts=4, top_k=1, noise=1.0)
    torch.nn.init.zeros_(layer.router.weight)
    torch.nn.init.zeros_(layer.router.bias)  # equal logits: only the noise decides
    layer.usage.copy_(torch.tensor([0.32, 0.32, 0.32, 0.04]))  # expert 3 rarely used
    layer.train()
    torch.manual_seed(1)
    gates, _, _ = layer.route(torch.zeros(4000, 16))
    picked = gates.argmax(-1).bincount(minlength=4).float() / 4000
    # expert 3 gets a +0.84 sigma shift: analytically picked ~50 %, the others ~17 % each
    assert picked[3] > 0.4 and (picked[:3] < 0.25).all()
    layer.usage.fill_(0.25)  # balanced usage: zero-mean noise, no favourite
    gates, _, _ = layer.route(torch.zeros(4000, 16))
    picked = gates.argmax(-1).bincount(minlength=4).float() / 4000
    assert ((picked - 0.25).abs() < 0.04).all()
    layer.eval()  # no noise in eval: ties resolve deterministically
    g1, _, _ = layer.route(torch.zeros(8, 16))
    g2, _, _ = layer.route(torch.zeros(8, 16))
    assert torch.equal(g1, g2)


def test_group_ema_update_uses_gate_mass_then_resets():
    layer = make_layer(experts=3, top_k=1)
    with torch.no_grad():
        for i, e in enumerate(layer.experts):
            for p in e.parameters():
                p.fill_(float(i + 1))
        for p in layer.director.parameters():
            p.fill_(0.0)
    layer.gate_mass_acc.copy_(torch.tensor([1.0, 0.0, 3.0]))
    w = layer.group_ema_update(0.9)
    assert torch.allclose(w, torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    # 0.9 * 0 + 0.1 * (0.25 * 1 + 0.75 * 3) = 0.25
    for p in layer.director.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.25))
    assert layer.gate_mass_acc.sum() == 0
    layer.usage.copy_(torch.tensor([0.0, 1.0, 0.0]))  # no mass since: falls back to usage
    w = layer.group_ema_update(0.0)
    assert torch.allclose(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert all(torch.allclose(p, torch.full_like(p, 2.0)) for p in layer.director.parameters())
    layer.usage.zero_()
    assert torch.allclose(layer.group_ema_update(0.5), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_padding_rows_do_not_change_real_rows():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    y1, _ = layer(x, pad)
    x2 = x.clone()
    x2[1, 4:] = 1e3
    y2, _ = layer(x2, pad)
    assert torch.allclose(y1[~pad], y2[~pad])


def test_dex_disabled_gives_plain_mlp_without_expert_keys():
    from fedpanfm.model.encoder import PanOrganEncoder

    enc = PanOrganEncoder(tiny_config(["model.dex.enabled=false"]))
    assert all(isinstance(b.mlp, PlainMLP) for b in enc.blocks) and enc.dex_layers() == []
    keys = list(enc.state_dict())
    assert not any("experts" in k or "director" in k or "router" in k for k in keys)
    assert "blocks.0.mlp.fc1.weight" in keys
    y, aux = enc.blocks[0].mlp(torch.randn(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool))
    assert y.shape == (2, 3, 32) and aux is None
