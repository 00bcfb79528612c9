"""PanFMSSL: one self-distillation step end to end on a tiny model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.config import ConfigError
from fedpanfm.model.encoder import EncoderOutput
from fedpanfm.model.meta_arch import GLOBAL_VIEWS, PanFMSSL
from fedpanfm.model.views import make_views

SCHED = {"teacher_temp": 0.04, "noise_std": 1.0}
ORGAN_SETS = [["heart", "adipose", "liver"], ["brain"], ["kidney", "spleen", "pancreas", "heart"], ["adipose", "brain"]]


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


def _model(cfg, seed: int = 0) -> PanFMSSL:
    torch.manual_seed(seed)
    return PanFMSSL(cfg).train()


def test_forward_backward_random_organ_subsets_no_grad_to_teacher_or_directors(cfg) -> None:
    model = _model(cfg)
    g = torch.Generator().manual_seed(0)
    names = list(cfg.data.organ_set())
    for trial in range(3):
        sets = [[o for o in names if torch.rand(1, generator=g) < 0.5] or ["liver"] for _ in range(4)]
        batch = make_batch(cfg, sets, seed=trial)
        out = model(batch, SCHED, generator=g)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(torch.tensor(v)) for v in out.metrics.values())
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        directors = [p for n, p in model.student.named_parameters() if ".mlp.director." in n]
        assert directors and all(p.grad is None for p in directors)
        assert model.student.encoder.blocks[0].mlp.experts[0].fc1.weight.grad is not None
        assert model.student.head.last_layer.weight.grad is not None
        assert out.stats.gate_mass.shape == (cfg.model.depth, cfg.model.dex.experts)
        want = torch.tensor([sum(o in s for s in sets) for o in names])
        assert torch.equal(out.stats.organ_subjects, want)
        assert torch.allclose(out.stats.saliency.sum(1), torch.ones(4))
    assert not model.teacher.training  # stays in eval mode under .train()
    assert model.masker.local_count.sum() > 0


def _redraw(model: PanFMSSL, batch, seed: int):
    """The views and masks ``model.forward`` draws from ``Generator(seed)``, in its order."""
    t = model.cfg.train
    gen = torch.Generator().manual_seed(seed)
    views = make_views(batch, GLOBAL_VIEWS, t.local_views, tuple(t.local_keep_ratio), model.augmenter, gen, model.crop_sizes)
    masker = copy.deepcopy(model.masker)
    organ_mask = masker.sample(views.global_views.present, gen)
    patch_mask = masker.sample_patch_mask(views.global_views, organ_mask, model.num_patches, gen)
    return views, organ_mask, patch_mask


def test_ibot_loss_counts_exactly_the_masked_positions_of_the_same_view(cfg) -> None:
    model = _model(cfg).eval()  # eval: no state changes, no router noise
    batch = make_batch(cfg, ORGAN_SETS, seed=1)
    out = model(batch, SCHED, generator=torch.Generator().manual_seed(5))
    # Independently: redraw the same views and masks, gather the masked tokens from the per-organ
    # position maps (not from the encoder's ``masked`` flag) and average per (view, subject) row.
    views, organ_mask, patch_mask = _redraw(model, batch, 5)
    gv = views.global_views
    with torch.no_grad():
        t = model.teacher(gv)
        s = model.student(gv, organ_mask, patch_mask)
        per_row: dict[int, list[torch.Tensor]] = {}
        for organ, m in patch_mask.items():
            pos = t.positions[organ]
            for i, row in enumerate(gv.index[organ].tolist()):
                for p in pos[i][m[i]].tolist():
                    ce = model.ibot_loss.row_losses(
                        model.student.head(s.tokens[row, p][None]), model.teacher.head(t.tokens[row, p][None]), 0.04
                    )
                    per_row.setdefault(row, []).append(ce[0])
    want = torch.stack([torch.stack(v).mean() for v in per_row.values()]).mean()
    assert out.metrics["loss/ibot"] == pytest.approx(want.item(), rel=1e-4)
    assert max(per_row) >= batch.size  # the second global view is masked and distilled too
    n_masked = sum(int(m.sum()) for m in patch_mask.values())
    n_tokens = sum(m.numel() for m in patch_mask.values())
    assert out.metrics["mask/token_ratio"] == pytest.approx(n_masked / n_tokens)


def test_dino_loss_pairs_teacher_global_views_with_every_other_student_view(cfg) -> None:
    model = _model(cfg).eval()
    batch = make_batch(cfg, ORGAN_SETS, seed=3)
    out = model(batch, SCHED, generator=torch.Generator().manual_seed(7))
    views, organ_mask, patch_mask = _redraw(model, batch, 7)
    B, V = batch.size, views.n_views
    assert V == GLOBAL_VIEWS + cfg.train.local_views == 4
    with torch.no_grad():
        t_cls = model.teacher.head(model.teacher(views.global_views).cls)
        s_cls = torch.cat([
            model.student.head(model.student(views.global_views, organ_mask, patch_mask).cls),
            model.student.head(model.student(views.local_views).cls),
        ])
    terms = []
    for g in range(GLOBAL_VIEWS):
        for v in range(V):
            if v != g:  # never the same view
                rows = [model.dino_loss.row_losses(s_cls[v * B + b][None], t_cls[g * B + b][None], 0.04)[0] for b in range(B)]
                terms.append(torch.stack(rows).mean())
    assert len(terms) == 6
    assert out.metrics["loss/dino"] == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def test_nothing_masked_gives_zero_ibot_loss() -> None:
    cfg = tiny_config(["train.masking.policy=none", "train.masking.patch_mask_ratio=0.0"])
    out = _model(cfg)(make_batch(cfg, ORGAN_SETS), SCHED)
    assert out.metrics["loss/ibot"] == 0.0 and out.metrics["mask/organ_ratio"] == 0.0


def test_weighted_total_and_eval_mode_changes_no_state(cfg) -> None:
    model = _model(cfg)
    batch = make_batch(cfg, ORGAN_SETS, seed=2)
    out = model(batch, SCHED, generator=torch.Generator().manual_seed(1))
    w = cfg.train.loss
    m = out.metrics
    want = w.dino * m["loss/dino"] + w.ibot * m["loss/ibot"] + w.dex * m["loss/dex"] + w.balance * m["loss/balance"]
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert not torch.equal(model.dino_loss.center, torch.zeros_like(model.dino_loss.center))
    # eval mode: no director target (no distillation term), centres and saliency frozen
    model.eval()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(batch, SCHED)
    assert "loss/dex" not in out.metrics
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_update_teacher_is_parameterwise_ema_including_directors(cfg) -> None:
    model = _model(cfg)
    batch = make_batch(cfg, ORGAN_SETS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(batch, SCHED).loss.backward()
    opt.step()
    w_before = model.student.encoder.blocks[1].mlp.director.fc1.weight.clone()
    model.update_directors(0.5)
    d_student = model.student.encoder.blocks[1].mlp.director.fc1.weight
    assert not torch.equal(d_student, w_before)  # experts moved, the director followed
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher(0.75)
    for (n, t), (_, s) in zip(model.teacher.named_parameters(), model.student.named_parameters()):
        assert torch.allclose(t, 0.75 * before[n] + 0.25 * s), n
    model.update_teacher(0.0)
    assert torch.equal(model.teacher.encoder.blocks[1].mlp.director.fc1.weight, d_student)
    assert model.encoder_for_eval() is model.teacher.encoder
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_state_dict_round_trip_keeps_masker_and_centres(cfg) -> None:
    model = _model(cfg)
    batch = make_batch(cfg, ORGAN_SETS)
    model(batch, SCHED)
    state = model.state_dict()
    for key in ("masker.local_saliency", "masker.global_saliency", "dino_loss.center", "ibot_loss.center",
                "student.encoder.blocks.0.mlp.experts.0.fc1.weight", "teacher.encoder.blocks.1.mlp.director.fc2.bias"):
        assert key in state, key
    fresh = _model(cfg, seed=1)
    fresh.load_state_dict(state)
    a = model.eval()(batch, SCHED, generator=torch.Generator().manual_seed(3)).loss
    b = fresh.eval()(batch, SCHED, generator=torch.Generator().manual_seed(3)).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_missing_schedule_key_and_dex_disabled() -> None:
    cfg = tiny_config(["model.dex.enabled=false"])
    model = _model(cfg)
    with pytest.raises(KeyError, match="noise_std"):
        model(make_batch(cfg, ORGAN_SETS), {"teacher_temp": 0.04})
    out = model(make_batch(cfg, ORGAN_SETS), SCHED)
    assert "loss/dex" not in out.metrics and "loss/balance" not in out.metrics
    assert torch.equal(out.stats.gate_mass, torch.zeros(cfg.model.depth, cfg.model.dex.experts))
    out.loss.backward()


def test_koleo_weight_enters_the_total() -> None:
    from fedpanfm.losses.koleo import koleo_loss

    cfg = tiny_config(["train.loss.koleo=0.5"])
    model = _model(cfg)
    batch = make_batch(cfg, ORGAN_SETS, seed=2)
    gen = torch.Generator().manual_seed(1)
    out = model(batch, SCHED, generator=gen)
    m, w = out.metrics, cfg.train.loss
    assert "loss/koleo" in m
    want = w.dino * m["loss/dino"] + w.ibot * m["loss/ibot"] + w.dex * m["loss/dex"] + w.balance * m["loss/balance"]
    assert out.loss.item() == pytest.approx(want + 0.5 * m["loss/koleo"], rel=1e-5)
    off = _model(tiny_config())(batch, SCHED, generator=torch.Generator().manual_seed(1))
    assert "loss/koleo" not in off.metrics  # the default weight 0 leaves the step unchanged
    assert koleo_loss(torch.zeros(1, 4)) is None


@pytest.mark.parametrize(("loss", "module", "param"), [("mae", "pixel_decoder", "pixel_decoder.heart.weight"),
                                                      ("organ_contrast", "organ_projector", "organ_projector.fc1.weight")])
def test_an_optional_loss_adds_its_module_and_enters_the_total(loss: str, module: str, param: str) -> None:
    base = _model(tiny_config())
    assert not any(module in k for k in base.state_dict())  # default state keys unchanged
    cfg = tiny_config([f"train.loss.{loss}=0.5"])
    model = _model(cfg)
    assert {f"student.{param}", f"teacher.{param}"} <= set(model.state_dict())
    out = model(make_batch(cfg, ORGAN_SETS, seed=2), SCHED, generator=torch.Generator().manual_seed(1))
    m, w = out.metrics, cfg.train.loss
    want = w.dino * m["loss/dino"] + w.ibot * m["loss/ibot"] + w.dex * m["loss/dex"] + w.balance * m["loss/balance"]
    assert out.loss.item() == pytest.approx(want + 0.5 * m[f"loss/{loss}"], rel=1e-5)
    out.loss.backward()
    grads = dict(model.named_parameters())
    assert grads[f"student.{param}"].grad is not None and grads[f"teacher.{param}"].grad is None


def test_organ_contrast_needs_local_views() -> None:
    with pytest.raises(ConfigError, match="local_views"):
        tiny_config(["train.loss.organ_contrast=1.0", "train.local_views=0"])


def _layout(rows: list[list[tuple[int, bool]]], dim: int, seed: int) -> EncoderOutput:
    """An encoder output whose row r holds the tokens rows[r] = [(organ id, masked), ...] after a CLS."""
    width = 1 + max(len(r) for r in rows)
    organ_id = torch.full((len(rows), width), -1, dtype=torch.long)
    masked = torch.zeros(len(rows), width, dtype=torch.bool)
    pad = torch.ones(len(rows), width, dtype=torch.bool)
    pad[:, 0] = False
    for i, r in enumerate(rows):
        for j, (organ, is_masked) in enumerate(r, start=1):
            organ_id[i, j], masked[i, j], pad[i, j] = organ, is_masked, False
    tokens = torch.randn(len(rows), width, dim, generator=torch.Generator().manual_seed(seed))
    return EncoderOutput(cls=tokens[:, 0], tokens=tokens, pad=pad, organ_id=organ_id, masked=masked,
                         cls_attn=torch.zeros(len(rows), width), dex=[], positions={})


def test_organ_contrast_pairs_each_local_organ_with_its_subjects_visible_global_organ() -> None:
    from fedpanfm.losses.organ_contrast import organ_contrast_loss

    cfg = tiny_config(["train.loss.organ_contrast=1.0"])
    model = _model(cfg)
    model.student.organ_projector = torch.nn.Identity()  # type: ignore[assignment]
    n_organs, dim = len(model.organs), cfg.model.dim
    # Subject 0 holds organs 0 and 1, subject 1 organs 1 and 2; rows are view-major (v0b0, v0b1, v1b0, v1b1).
    # Organ 0 of subject 0 is wholly masked in global view 0, so its key is view 1's alone; organ 2 of
    # subject 1 is wholly masked in both views: no key, and its local query is left out.
    g_rows = [[(0, True), (0, True), (1, False), (1, True)], [(1, False), (2, True)],
              [(0, False), (0, True), (1, False)], [(1, False), (2, True), (2, True)]]
    l_rows = [[(1, False)], [(2, False), (1, False)], [(0, False), (1, False)], [(1, False)]]
    g_out, l_out = _layout(g_rows, dim, 0), _layout(l_rows, dim, 1)

    def present(rows: list[list[tuple[int, bool]]]) -> SimpleNamespace:
        p = torch.zeros(len(rows), n_organs, dtype=torch.bool)
        for i, r in enumerate(rows):
            for organ, _ in r:
                p[i, organ] = True
        return SimpleNamespace(present=p)

    def mean(out: EncoderOutput, row: int, organ: int) -> torch.Tensor:
        # The organ's mean output token over all its tokens, masked ones too (a visible token only
        # decides whether the view counts).
        return out.tokens[row][out.organ_id[row] == organ].mean(0)

    keys = torch.stack([mean(g_out, 2, 0),                                   # subject 0, organ 0: view 1 only
                        (mean(g_out, 0, 1) + mean(g_out, 2, 1)) / 2,         # subject 0, organ 1
                        (mean(g_out, 1, 1) + mean(g_out, 3, 1)) / 2])        # subject 1, organ 1
    queries = torch.stack([mean(l_out, 0, 1), mean(l_out, 1, 1), mean(l_out, 2, 0), mean(l_out, 2, 1),
                           mean(l_out, 3, 1)])
    want = organ_contrast_loss(queries, keys, torch.tensor([1, 2, 0, 1, 2]), cfg.train.organ_contrast_temp)
    got = model._organ_contrast(present(g_rows), g_out, present(l_rows), l_out, 2)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_local_crops_train_the_positional_embeddings_through_their_interpolation() -> None:
    cfg = tiny_config(["train.local_crop=0.5", "train.loss.organ_contrast=1.0", "train.local_keep_ratio=[1.0, 1.0]"])
    model = _model(cfg)
    assert model.crop_sizes is not None and model.crop_sizes["heart"] == (8, 8)  # of 16x16
    batch = make_batch(cfg, ORGAN_SETS, seed=3)
    views, _, _ = _redraw(model, batch, seed=4)
    assert views.local_views is not None and views.local_views.images["heart"].shape[2:] == (8, 8)
    out = model(batch, SCHED, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(out.loss) and "loss/organ_contrast" in out.metrics
    # only the local views hold crops: a loss on their CLS alone still reaches the heart's positions
    local_cls = model.student(views.local_views, crops=True).cls
    local_cls.square().sum().backward()
    assert model.student.encoder.tokenizer.tokenizer("heart").pos_embed.grad.abs().sum() > 0
