"""Organ tokenizers: sequence layout, masking by token replacement, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_config
from torch import nn

from fedpanfm.model.tokenizer import OrganTokenizer, PanOrganTokenizer, gather_organ_tokens, patch_embedding

ORGAN_SETS = [["brain", "heart"], ["liver"], ["heart", "adipose", "pancreas"], ["kidney", "spleen", "brain"]]


def make_tokenizer(seed: int = 0) -> tuple[PanOrganTokenizer, object]:
    torch.manual_seed(seed)
    cfg = tiny_config()
    return PanOrganTokenizer(cfg.data.organ_set(), cfg.data.organs, cfg.model.dim), cfg


def test_organ_tokenizer_2d_and_3d_shapes():
    cfg = tiny_config()
    brain = OrganTokenizer(cfg.data.organs["brain"], 32)  # 8x8x8 grid, 4^3 patches
    heart = OrganTokenizer(cfg.data.organs["heart"], 32)  # 16x16 grid, 4x4 patches
    assert isinstance(brain.patch_embed, torch.nn.Conv3d) and isinstance(heart.patch_embed, torch.nn.Conv2d)
    assert brain(torch.randn(3, 1, 8, 8, 8)).shape == (3, 8, 32)
    assert heart(torch.randn(2, 1, 16, 16)).shape == (2, 16, 32)
    assert tuple(brain.pos_embed.shape) == (8, 32) and tuple(brain.organ_embed.shape) == (32,)


def test_patch_order_is_row_major():
    """Token j of a 2D organ is the patch at (j // 4, j % 4) of its 4x4 patch grid."""
    cfg = tiny_config()
    tok = OrganTokenizer(cfg.data.organs["heart"], 32)
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 4:8, 8:12] = 1.0  # patch row 1, col 2 -> index 6
    x = tok.patchify(img)[0]
    base = tok.patchify(torch.zeros(1, 1, 16, 16))[0]
    changed = (x - base).abs().sum(-1) > 0
    assert changed.nonzero().flatten().tolist() == [6]


def test_layout_vocabulary_order_padding_and_positions():
    tz, cfg = make_tokenizer()
    batch = make_batch(cfg, ORGAN_SETS)
    ts = tz(batch)
    P = {o: cfg.data.organs[o].num_patches for o in cfg.data.organ_set()}
    lengths = [1 + sum(P[o] for o in s) for s in ORGAN_SETS]
    assert ts.tokens.shape == (4, max(lengths), 32)
    assert (~ts.pad).sum(1).tolist() == lengths
    names = cfg.data.organ_set().names
    for b, s in enumerate(ORGAN_SETS):
        want = [-1] + [names.index(o) for o in sorted(s, key=names.index) for _ in range(P[o])]
        want += [-1] * (max(lengths) - len(want))
        assert ts.organ_id[b].tolist() == want
        assert not ts.pad[b, : lengths[b]].any() and ts.pad[b, lengths[b] :].all()
    # positions map every organ image's tokens back to the sequence
    for o, pos in ts.positions.items():
        own = tz.organs[o](batch.images[o])
        assert torch.allclose(gather_organ_tokens(ts.tokens, batch, ts.positions, o), own)
        assert (ts.organ_id[batch.index[o][:, None], pos] == names.index(o)).all()
    assert torch.allclose(ts.tokens[:, 0], tz.cls_token[0].expand(4, -1))
    assert (ts.tokens[ts.pad] == 0).all() and not ts.masked.any()


def test_masked_organ_and_patch_become_mask_token_with_identical_layout():
    tz, cfg = make_tokenizer()
    batch = make_batch(cfg, ORGAN_SETS)
    organs = cfg.data.organ_set()
    organ_mask = torch.zeros(4, len(organs), dtype=torch.bool)
    organ_mask[2, organs.index("heart")] = True  # subject 2 loses its heart
    patch_mask = {"liver": torch.zeros(1, 8, dtype=torch.bool)}
    patch_mask["liver"][0, 3] = True
    full, student = tz(batch), tz(batch, organ_mask, patch_mask)
    # identical layouts: the property the meta-architecture relies on to align teacher and student
    assert torch.equal(full.pad, student.pad) and torch.equal(full.organ_id, student.organ_id)
    assert all(torch.equal(full.positions[o], student.positions[o]) for o in full.positions)
    heart_rows = (batch.index["heart"] == 2).nonzero().item()
    heart_pos = student.positions["heart"][heart_rows]
    liver_pos = student.positions["liver"][0, 3]
    expected = torch.zeros_like(student.masked)
    expected[2, heart_pos] = True
    expected[1, liver_pos] = True
    assert torch.equal(student.masked, expected)
    heart = tz.organs["heart"]
    want = tz.mask_token + heart.pos_embed + heart.organ_embed  # mask token replaces the patch embedding
    assert torch.allclose(student.tokens[2, heart_pos], want)
    liver = tz.organs["liver"]
    assert torch.allclose(student.tokens[1, liver_pos], tz.mask_token + liver.pos_embed[3] + liver.organ_embed)
    unchanged = ~expected
    assert torch.allclose(student.tokens[unchanged], full.tokens[unchanged])


def test_masked_patch_gets_no_gradient_to_patch_embedding():
    tz, cfg = make_tokenizer()
    batch = make_batch(cfg, [["heart"]])
    organ_mask = torch.zeros(1, 7, dtype=torch.bool)
    organ_mask[0, 1] = True
    tz(batch, organ_mask).tokens.sum().backward()
    assert tz.organs["heart"].patch_embed.weight.grad.abs().sum() == 0
    assert tz.mask_token.grad.abs().sum() > 0


def test_missing_organ_contributes_nothing():
    tz, cfg = make_tokenizer()
    ts = tz(make_batch(cfg, [["kidney"], ["kidney"]]))
    assert ts.tokens.shape[1] == 1 + cfg.data.organs["kidney"].num_patches
    assert set(ts.positions) == {"kidney"}


@pytest.mark.parametrize(
    "breaker, message",
    [
        (lambda b: b.images.__setitem__("heart", torch.randn(1, 1, 8, 8)), "images\\['heart'\\] has shape"),
        (lambda b: b.images.__setitem__("heart", torch.randn(1, 1, 10, 10)), "images\\['heart'\\] has shape"),
        (lambda b: b.images.__setitem__("heart", torch.randn(1, 1, 20, 20)), "images\\['heart'\\] has shape"),
        (lambda b: b.index.__setitem__("heart", torch.tensor([1])), "disagrees with batch.present"),
        (lambda b: b.index.__setitem__("heart", torch.tensor([5])), "outside"),
        (lambda b: b.images.pop("liver"), "liver"),
        (lambda b: setattr(b, "organ_names", ("a",)), "vocabulary"),
    ],
)
def test_bad_batch_names_the_fault(breaker, message):
    tz, cfg = make_tokenizer()
    batch = make_batch(cfg, [["heart"], ["liver"]])
    breaker(batch)
    with pytest.raises(ValueError, match=message):
        tz(batch)


def test_bad_masks_name_the_fault():
    tz, cfg = make_tokenizer()
    batch = make_batch(cfg, [["heart"], ["liver"]])
    with pytest.raises(ValueError, match="organ_mask"):
        tz(batch, organ_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_mask\\['brain'\\]"):
        tz(batch, patch_mask={"brain": torch.zeros(1, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="patch_mask\\['heart'\\]"):
        tz(batch, patch_mask={"heart": torch.zeros(1, 5, dtype=torch.bool)})


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(16, 64, (8, 4), stride=(8, 4)), (5, 16, 32, 24)),
    (nn.Conv3d(3, 32, (2, 4, 4), stride=(2, 4, 4)), (2, 3, 8, 16, 12)),
])
def test_patch_embedding_is_the_patch_convolution(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    ref = conv(x).flatten(2).transpose(1, 2)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    for inp in (x, x.contiguous(memory_format=fmt)):  # the stem hands it channels-last tensors
        out = patch_embedding(inp, conv)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The same gradients reach the conv's weight and the input.
    grads = torch.autograd.grad(ref.square().sum(), [conv.weight, x])
    mine = torch.autograd.grad(patch_embedding(x, conv).square().sum(), [conv.weight, x])
    for a, b in zip(mine, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_crops_embed_at_their_own_patch_grid_with_interpolated_positions() -> None:
    tz, cfg = make_tokenizer()
    heart, brain = tz.tokenizer("heart"), tz.tokenizer("brain")  # 16x16 / 4x4 patches; 8x8x8 / 4^3
    assert torch.equal(heart.position_embedding((16, 16)), heart.pos_embed)
    # A constant field interpolates to itself; a crop's grid gets one embedding per patch.
    with torch.no_grad():
        heart.pos_embed.copy_(torch.ones_like(heart.pos_embed) * torch.arange(32.0))
        brain.pos_embed.copy_(torch.ones_like(brain.pos_embed) * torch.arange(32.0))
    assert torch.allclose(heart.position_embedding((8, 12)), torch.arange(32.0).expand(6, 32), atol=1e-5)
    assert torch.allclose(brain.position_embedding((4, 4, 4)), torch.arange(32.0).expand(1, 32), atol=1e-5)
    # A batch with crops: the sequence holds the crops' patches, each where positions say.
    batch = make_batch(cfg, [["heart", "liver"], ["heart"]])
    batch.images["heart"] = batch.images["heart"][..., 4:12, 0:12]  # 2x3 patches
    with pytest.raises(ValueError, match="expected \\(n, 1, 16, 16\\)$"):
        tz(batch)  # a smaller image is an error unless crops are allowed
    ts = tz(batch, crops=True)
    P_liver = cfg.data.organs["liver"].num_patches
    assert (~ts.pad).sum(1).tolist() == [1 + 6 + P_liver, 1 + 6]
    assert tuple(ts.positions["heart"].shape) == (2, 6)
    assert torch.allclose(gather_organ_tokens(ts.tokens, batch, ts.positions, "heart"), heart(batch.images["heart"]))
    # patch masks of a crop have the crop's patch count
    ts = tz(batch, patch_mask={"heart": torch.ones(2, 6, dtype=torch.bool)}, crops=True)
    assert int(ts.masked.sum()) == 12
    with pytest.raises(ValueError, match="patch_mask\\['heart'\\]"):
        tz(batch, patch_mask={"heart": torch.ones(2, 16, dtype=torch.bool)}, crops=True)
    batch.images["heart"] = torch.randn(2, 1, 10, 10)
    with pytest.raises(ValueError, match="or a crop of whole 4x4 patches"):
        tz(batch, crops=True)
