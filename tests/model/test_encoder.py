"""The pan-organ encoder: shapes, batch independence, padding, CLS attention, heads."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.federation.param_groups import classify
from fedpanfm.model.attention import LayerScale
from fedpanfm.model.encoder import PanOrganEncoder
from fedpanfm.model.heads import DINOHead
from fedpanfm.model.meta_arch import PanFMSSL
from fedpanfm.model.tokenizer import TokenSet
from fedpanfm.train.engine import param_groups

ORGANS = ["brain", "heart", "adipose", "liver", "kidney", "spleen", "pancreas"]


def make_encoder(seed: int = 0, overrides: list[str] | None = None) -> tuple[PanOrganEncoder, object]:
    torch.manual_seed(seed)
    cfg = tiny_config(overrides)
    return PanOrganEncoder(cfg), cfg


def random_sets(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(ORGANS, rng.randint(1, len(ORGANS))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shapes_for_random_organ_subsets(seed):
    enc, cfg = make_encoder()
    sets = random_sets(3, seed)
    batch = make_batch(cfg, sets, seed=seed)
    out = enc.train()(batch)
    n_tok = [sum(cfg.data.organs[o].num_patches for o in s) for s in sets]
    N = 1 + max(n_tok)
    assert out.tokens.shape == (3, N, 32) and out.cls.shape == (3, 32)
    assert out.pad.shape == out.organ_id.shape == out.masked.shape == out.cls_attn.shape == (3, N)
    assert len(out.dex) == cfg.model.depth
    for aux in out.dex:
        assert aux.gates.shape == aux.probs.shape == (3, cfg.model.dex.experts)
        assert aux.topk.shape == (3, cfg.model.dex.top_k)
        assert aux.expert_out.shape == aux.director_out.shape == (3, N, 32)
    assert torch.isfinite(out.tokens).all()
    assert torch.allclose(out.cls, out.tokens[:, 0])
    out.cls.sum().backward()
    assert enc.tokenizer.cls_token.grad is not None
    assert enc.embed(batch).shape == (3, 32)


def test_cls_attention_is_a_distribution_over_real_tokens():
    enc, cfg = make_encoder()
    batch = make_batch(cfg, [["brain"], ["heart", "adipose", "liver"], ["kidney", "pancreas"]])
    out = enc.eval()(batch)
    assert out.pad.any()  # the test needs padding
    assert torch.allclose(out.cls_attn.sum(-1), torch.ones(3), atol=1e-6)
    assert (out.cls_attn[out.pad] == 0).all()
    assert (out.cls_attn[~out.pad] > 0).all()


def test_cls_attention_matches_explicit_softmax_of_last_block():
    enc, cfg = make_encoder()
    batch = make_batch(cfg, [["brain", "liver"], ["heart"]])
    seen = {}
    last = enc.blocks[-1]
    hook = last.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach()))
    out = enc.eval()(batch)
    hook.remove()
    x = seen["x"]
    B, N, D = x.shape
    H = cfg.model.heads
    q, k, _ = last.attn.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / (D // H) ** 0.5  # (B, H, N, N), all rows
    scores = scores.masked_fill(out.pad[:, None, None, :], float("-inf"))
    want = scores.softmax(-1)[:, :, 0].mean(1)
    assert torch.allclose(out.cls_attn, want, atol=1e-6)
    assert all(b.attn.return_cls_attn == (i == len(enc.blocks) - 1) for i, b in enumerate(enc.blocks))


@pytest.mark.parametrize("train", [False, True])
def test_subject_output_independent_of_batch_mates(train):
    enc, cfg = make_encoder()
    for layer in enc.dex_layers():
        layer.noise_std = 0.0  # routing noise off; training mode otherwise
    enc.train(train)
    batch = make_batch(cfg, [["heart"], ["brain", "heart", "adipose", "liver", "kidney"], ["pancreas", "spleen"]])
    with torch.no_grad():
        together = enc(batch)
        for b in range(batch.size):
            alone = enc(batch.select([b]))
            n = int((~together.pad[b]).sum())
            assert alone.tokens.shape[1] == n
            assert torch.allclose(alone.tokens[0], together.tokens[b, :n], atol=1e-5)
            assert torch.allclose(alone.cls_attn[0], together.cls_attn[b, :n], atol=1e-5)
            for a, t in zip(alone.dex, together.dex):
                assert torch.allclose(a.gates[0], t.gates[b], atol=1e-5)


def test_padding_values_never_influence_real_tokens():
    enc, cfg = make_encoder()
    batch = make_batch(cfg, [["kidney"], ["heart", "adipose"]])
    enc.eval()
    with torch.no_grad():
        clean = enc(batch)

        def scramble(module, args, ts: TokenSet) -> TokenSet:
            noise = torch.randn_like(ts.tokens) * 100
            ts.tokens = torch.where(ts.pad[..., None], noise, ts.tokens)
            return ts

        hook = enc.tokenizer.register_forward_hook(scramble)
        dirty = enc(batch)
        hook.remove()
    real = ~clean.pad
    assert clean.pad.any()
    assert torch.allclose(clean.tokens[real], dirty.tokens[real], atol=1e-5)
    assert torch.allclose(clean.cls_attn, dirty.cls_attn, atol=1e-6)
    assert torch.isfinite(dirty.tokens).all()  # padded query rows stay finite


def test_masking_keeps_layout_and_marks_positions():
    enc, cfg = make_encoder()
    batch = make_batch(cfg, [["brain", "heart"], ["liver", "kidney"]])
    organ_mask = torch.zeros(2, 7, dtype=torch.bool)
    organ_mask[0, 1] = True
    enc.eval()
    full, masked = enc(batch), enc(batch, organ_mask=organ_mask)
    assert torch.equal(full.pad, masked.pad) and torch.equal(full.organ_id, masked.organ_id)
    assert torch.equal(masked.masked, (full.organ_id == 1) & (torch.arange(2)[:, None] == 0))
    assert not torch.allclose(full.cls[0], masked.cls[0])
    assert torch.allclose(full.cls[1], masked.cls[1], atol=1e-6)  # subject 1 untouched


def test_bf16_encoder_accepts_fp32_images():
    enc, cfg = make_encoder()
    enc = enc.to(torch.bfloat16).train()
    out = enc(make_batch(cfg, [["brain"], ["heart", "liver"]]))
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.tokens.float()).all()
    assert torch.allclose(out.cls_attn.sum(-1), torch.ones(2), atol=1e-3)


def test_dino_head_normalised_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, 32, 16, 10)
    x = torch.randn(4, 7, 32)
    logits = head(x)
    assert logits.shape == (4, 7, 10)
    # an independent reading: cosine between the normalised bottleneck and each prototype
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    want = torch.nn.functional.cosine_similarity(z[..., None, :], head.last_layer.weight, dim=-1)
    assert torch.allclose(logits, want, atol=1e-6)
    # scaling a prototype changes nothing: the weight is normalised per row
    with torch.no_grad():
        head.last_layer.weight[3] *= 5.0
    assert torch.allclose(head(x), logits, atol=1e-6)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3


def test_layerscale_scales_each_residual_branch():
    """model.layerscale: both branches of every block are scaled per channel from the given start
    (the blocks start near the identity), the scales train without weight decay, and 0 leaves the
    block without them."""
    plain, _ = make_encoder()
    assert not any(isinstance(m, LayerScale) for m in plain.modules())
    enc, cfg = make_encoder(overrides=["model.layerscale=0.25"])
    block = enc.blocks[0]
    assert isinstance(block.ls1, LayerScale) and torch.equal(block.ls2.gamma, torch.full((32,), 0.25))
    # The block is x + g1 * attn(norm1(x)), then + g2 * mlp(norm2(.)): recompute it by hand.
    torch.manual_seed(3)
    x, pad = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.1, 0.5)
        block.ls2.gamma.uniform_(0.1, 0.5)
        y, _, _ = block.eval()(x, pad)
        h = x + block.ls1.gamma * block.attn(block.norm1(x), pad)[0]
        expected = h + block.ls2.gamma * block.mlp.eval()(block.norm2(h), pad)[0]
    assert torch.allclose(y, expected, atol=1e-6)
    # Started at 1e-5, every block is the identity to within its scale.
    tiny, cfg = make_encoder(overrides=["model.layerscale=1e-5"])
    with torch.no_grad():
        for b in tiny.blocks:
            out, _, _ = b.eval()(x, pad)
            assert (out - x).abs().max() < 1e-3 and not torch.equal(out, x)
    groups = param_groups(tiny)
    no_decay = {id(p) for g in groups if g["wd_scale"] == 0.0 for p in g["params"]}
    assert all(id(b.ls1.gamma) in no_decay and id(b.ls2.gamma) in no_decay for b in tiny.blocks)
    # The federation averages them with the backbone (not a DEX director, expert or organ group).
    keys = [k for k in PanFMSSL(cfg).state_dict() if k.endswith((".ls1.gamma", ".ls2.gamma"))]
    assert len(keys) == 2 * 2 * cfg.model.depth  # student and teacher, two per block
    assert {(classify(k).kind, classify(k).layer) for k in keys} == {("shared", None)}
