"""The aggregation maths against hand-computed values: key classes, weighted means, saliency,
teacher policies, buffers and the update checks."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.directors import director_momentum
from fedpanfm.federation.means import mean_group, weighted_mean
from fedpanfm.federation.param_groups import ParamGroup, classify, counterpart, group_keys
from fedpanfm.federation.planning import plan_means
from fedpanfm.federation.saliency import aggregate_saliency
from fedpanfm.federation.teacher_policy import server_ema_teacher
from fedpanfm.federation.tensor_codec import MessageError
from fedpanfm.federation.validation import check_update


@pytest.mark.parametrize(
    "key,group",
    [
        ("student.encoder.tokenizer.organs.heart.patch_embed.weight", ParamGroup("student", "organ", organ="heart")),
        ("teacher.encoder.tokenizer.organs.brain.pos_embed", ParamGroup("teacher", "organ", organ="brain")),
        ("student.encoder.blocks.1.mlp.experts.3.fc2.bias", ParamGroup("student", "expert", layer=1, expert=3)),
        ("teacher.encoder.blocks.12.mlp.director.fc1.weight", ParamGroup("teacher", "director", layer=12)),
        ("student.encoder.blocks.0.mlp.gate_mass_acc", ParamGroup("student", "accumulator", layer=0)),
        ("student.encoder.blocks.0.mlp.usage", ParamGroup("student", "shared")),
        ("student.encoder.blocks.0.mlp.router.weight", ParamGroup("student", "shared")),
        ("student.encoder.blocks.0.mlp.fc1.weight", ParamGroup("student", "shared")),  # PlainMLP (DEX off)
        ("student.encoder.tokenizer.cls_token", ParamGroup("student", "shared")),
        ("teacher.head.last_layer.weight", ParamGroup("teacher", "shared")),
        ("dino_loss.center", ParamGroup("other", "shared")),
        ("masker.local_saliency", ParamGroup("other", "shared")),
        # Near misses of the layout stay shared.
        ("student.encoder.experts.0.fc1.weight", ParamGroup("student", "shared")),
        ("student.tokenizer.organs.heart.pos_embed", ParamGroup("student", "shared")),
    ],
)
def test_classify(key, group):
    assert classify(key) == group


def test_group_keys_and_counterpart_on_the_real_model():
    cfg = tiny_config()
    state = global_model_state(cfg)
    groups = group_keys(state)
    L, E, O = cfg.model.depth, cfg.model.dex.experts, len(cfg.data.organ_set())
    kinds = [g.kind for g in groups]
    assert kinds.count("organ") == 2 * O and kinds.count("expert") == 2 * L * E
    assert kinds.count("director") == 2 * L and kinds.count("accumulator") == 2 * L
    assert sum(len(v) for v in groups.values()) == len(state)
    assert counterpart("teacher.encoder.norm.weight", "student") == "student.encoder.norm.weight"
    with pytest.raises(ValueError, match="dino_loss.center"):
        counterpart("dino_loss.center", "student")


def test_weighted_mean_against_hand_values():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(weighted_mean([a, b], [1.0, 3.0]), torch.tensor([2.5, 5.0]))
    assert weighted_mean([a, b], [0.0, 0.0]) is None
    assert weighted_mean([torch.tensor([1, 2]), torch.tensor([2, 5])], [1, 1]).tolist() == [2, 4]  # 1.5 -> 2, 3.5 -> 4
    assert weighted_mean([a, b], [2.0, 0.0]).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=">= 0"):
        weighted_mean([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([a, torch.zeros(3)], [1.0, 1.0])


def test_mean_group_keeps_previous_object_when_nobody_has_weight():
    prev = {"k": torch.ones(2)}
    out = mean_group(["k"], [{"k": torch.zeros(2)}], torch.zeros(1, dtype=torch.float64), prev)
    assert out["k"] is prev["k"]


def test_aggregate_saliency_by_hand():
    # organ 0: both sites, weights 3 and 1 -> (0.6*3 + 0.2*1)/4 = 0.5; organ 1: only site B -> 0.4;
    # organ 2: nobody -> previous 0.1. Then shares: [0.5, 0.4, 0.1] / 1.0.
    s = aggregate_saliency(
        [torch.tensor([0.6, 0.9, 0.3]), torch.tensor([0.2, 0.4, 0.7])],
        [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 5.0, 0.0])],
        previous=torch.tensor([0.3, 0.6, 0.1]),
    )
    assert torch.allclose(s, torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64))
    u = aggregate_saliency([torch.tensor([1.0, 1.0])], [torch.tensor([2.0, 2.0])])
    assert torch.allclose(u, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="sites"):
        aggregate_saliency([torch.ones(2)], [])


def test_director_momentum_follows_the_round_cosine():
    cfg = tiny_config(["federation.rounds=5"])
    dex = cfg.model.dex
    assert director_momentum(cfg, 1) == pytest.approx(dex.gema_momentum_start)
    assert director_momentum(cfg, 5) == pytest.approx(dex.gema_momentum_end)
    assert director_momentum(cfg, 3) == pytest.approx((dex.gema_momentum_start + dex.gema_momentum_end) / 2)
    # A round of 10 local steps moves the director as much as 10 local group-EMA steps would.
    assert director_momentum(cfg, 1, local_steps=10) == pytest.approx(dex.gema_momentum_start**10)
    assert director_momentum(cfg, 5, local_steps=0) == pytest.approx(dex.gema_momentum_end)


def test_server_ema_teacher_formula():
    prev = {"teacher.w": torch.tensor([1.0, 2.0])}
    new = {"student.w": torch.tensor([3.0, -2.0])}
    out = server_ema_teacher(new, prev, 0.75)
    assert torch.allclose(out["teacher.w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2]))


@pytest.mark.parametrize("policy", ["aggregate", "server_ema", "local"])
def test_teacher_policies(policy):
    cfg = tiny_config([f"federation.teacher_policy={policy}", "federation.server_teacher_momentum=0.8"])
    g = global_model_state(cfg)
    ups = [fake_site_update(cfg, g, f"s{i}", 4 + i, seed=i) for i in range(2)]
    new, _ = aggregate_round(g, ups, cfg, 1)
    k = "teacher.encoder.blocks.0.attn.qkv.weight"
    sk = counterpart(k, "student")
    if policy == "aggregate":
        expected = (4 * ups[0].state[k] + 5 * ups[1].state[k]) / 9
    elif policy == "server_ema":
        expected = 0.8 * g[k] + 0.2 * new[sk]
    else:
        expected = g[k]
    assert torch.allclose(new[k], expected, atol=1e-6)
    assert not torch.allclose(new[sk], g[sk])  # the student always moves


def test_buffers_and_metrics():
    cfg = tiny_config()
    g = global_model_state(cfg)
    g["student.encoder.blocks.0.mlp.gate_mass_acc"] = torch.full((4,), 7.0)
    ups = [fake_site_update(cfg, g, f"s{i}", 3, seed=i) for i in range(3)]
    new, out = aggregate_round(g, ups, cfg, 1)
    assert list(new) == list(g)
    assert torch.equal(new["student.encoder.blocks.0.mlp.gate_mass_acc"], torch.zeros(4))
    usage = new["student.encoder.blocks.1.mlp.usage"]
    assert torch.allclose(usage, sum(u.state["student.encoder.blocks.1.mlp.usage"] for u in ups) / 3, atol=1e-6)
    m = out.metrics
    for l in range(cfg.model.depth):
        assert sum(m[f"expert_usage/layer{l}/e{e}"] for e in range(4)) == pytest.approx(1.0)
        assert m[f"director_divergence/layer{l}"] > 0
    assert sum(m[f"saliency/{o}"] for o in cfg.data.organ_set()) == pytest.approx(1.0)
    assert m["bytes/received"] == 3 * sum(t.numel() * t.element_size() for t in g.values())
    assert m["sites"] == 3 and m["subjects"] == 9 and m["train/loss/dino"] == 1.0
    assert torch.allclose(out.saliency, torch.tensor([m[f"saliency/{o}"] for o in cfg.data.organ_set()], dtype=torch.float64))


def test_plan_weights_follow_the_group_kind():
    cfg = tiny_config(["federation.teacher_policy=server_ema"])
    g = global_model_state(cfg)
    a = fake_site_update(cfg, g, "a", 10, organ_subjects=[10, 0, 3, 10, 10, 10, 10])
    tasks = {t.group: t.weights.tolist() for t in plan_means(g, [a, a], cfg)}
    assert tasks[ParamGroup("student", "organ", organ="heart")] == [0.0, 0.0]
    assert tasks[ParamGroup("student", "organ", organ="adipose")] == [3.0, 3.0]
    assert tasks[ParamGroup("student", "expert", layer=1, expert=2)] == [float(a.gate_mass[1, 2])] * 2
    assert tasks[ParamGroup("other", "shared")] == [10.0, 10.0]
    assert not any(gr.role == "teacher" for gr in tasks)  # server_ema never averages site teachers
    assert not any(gr.kind in ("director", "accumulator") for gr in tasks)


def test_check_update_names_the_fault():
    cfg = tiny_config(["federation.teacher_policy=local"])
    g = global_model_state(cfg)
    u = fake_site_update(cfg, g, "a", 5)
    u.state = {k: v for k, v in u.state.items() if not k.startswith("teacher.")}
    check_update(u, g, cfg)  # "local": the site's teacher is not needed
    del u.state["student.encoder.norm.bias"]
    with pytest.raises(MessageError, match="site a.*student.encoder.norm.bias"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "b", 5)
    u.state["student.encoder.norm.bias"] = torch.zeros(3)
    with pytest.raises(MessageError, match=r"norm.bias.*\(3,\)"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "c", 5)
    u.state["student.extra"] = torch.zeros(1)
    with pytest.raises(MessageError, match="unknown weight 'student.extra'"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "d", 5, gate_mass=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(MessageError, match="all zero"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "e", 5, gate_mass=torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(MessageError, match="does not cover"):
        check_update(u, g, cfg)
