"""Ray aggregation gives bit-identical results to the serial path; a tiny local Ray (1 CPU, no
dashboard) is started here and shut down after."""

from __future__ import annotations

import pytest
import ray
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.planning import plan_means
from orchestration.ray_aggregation import (
    RayAggregator,
    SerialAggregator,
    make_aggregator,
    pack_tasks,
)


def test_make_aggregator_serial_when_ray_disabled():
    had_ray = ray.is_initialized()
    assert isinstance(make_aggregator(tiny_config(["federation.ray.enabled=false"])), SerialAggregator)
    assert ray.is_initialized() == had_ray  # a disabled Ray is never started


def test_pack_tasks_covers_every_group_once():
    cfg = tiny_config()
    g = global_model_state(cfg)
    ups = [fake_site_update(cfg, g, "a", 3)]
    tasks = plan_means(g, ups, cfg)
    bins = pack_tasks(tasks, g, 3)
    assert len(bins) == 3 and all(bins)
    assert sorted(id(t) for b in bins for t in b) == sorted(id(t) for t in tasks)
    sizes = [sum(g[k].numel() for t in b for k in t.keys) for b in bins]
    assert max(sizes) <= 2 * min(sizes)  # balanced by bytes


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # another test module's Ray: use it, leave it to its owner
        yield
        return
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("policy", ["server_ema", "aggregate"])
def test_ray_and_serial_are_identical(local_ray, policy):
    cfg = tiny_config([f"federation.teacher_policy={policy}"])
    g = global_model_state(cfg)
    ups = [
        fake_site_update(cfg, g, "a", 6, organ_subjects=[6, 6, 0, 6, 6, 0, 0], seed=1),
        fake_site_update(cfg, g, "b", 4, organ_subjects=[0, 4, 4, 4, 0, 0, 0], seed=2),
        fake_site_update(cfg, g, "c", 9, seed=3,
                         gate_mass=torch.tensor([[1.0, 0, 0, 2], [0, 0, 3, 1]], dtype=torch.float64)),
    ]
    prev_sal = torch.rand(7, dtype=torch.float64)
    serial, s_out = SerialAggregator().aggregate(g, ups, cfg, 2, prev_sal)
    agg = make_aggregator(cfg)
    assert isinstance(agg, RayAggregator)
    parallel, r_out = RayAggregator(max_tasks=3).aggregate(g, ups, cfg, 2, prev_sal)
    assert list(parallel) == list(serial)
    for k in serial:
        assert torch.equal(parallel[k], serial[k]), k
        assert parallel[k].dtype == serial[k].dtype
    assert r_out.metrics == s_out.metrics and torch.equal(r_out.saliency, s_out.saliency)
    # The result owns writable memory (not a view into the object store).
    parallel["student.encoder.norm.weight"].add_(1.0)


def test_received_updates_are_staged_and_give_the_serial_result(local_ray):
    # Sparse expert transfer (a site leaves out experts it did not route to), an organ no site
    # holds (its group keeps the previous tensors without a Ray task), updates put into the
    # object store as they are received.
    from fedpanfm.federation.transfer import select_transfer

    cfg = tiny_config(["federation.sparse_experts=true"])
    g = global_model_state(cfg)
    ups = [
        fake_site_update(cfg, g, "a", 6, organ_subjects=[6, 6, 0, 6, 6, 0, 0], seed=1),
        fake_site_update(cfg, g, "c", 9, organ_subjects=[9, 0, 9, 9, 9, 9, 0], seed=3,
                         gate_mass=torch.tensor([[1.0, 0, 0, 2], [0, 0, 3, 1]], dtype=torch.float64)),
    ]
    for u in ups:
        u.state, u.gate_mass = select_transfer(u.state, u.gate_mass, cfg)
    assert "student.encoder.blocks.0.mlp.experts.1.fc1.weight" not in ups[1].state
    serial, s_out = SerialAggregator().aggregate(g, ups, cfg, 2)
    agg = RayAggregator(max_tasks=2, serial_below_bytes=1)
    for u in ups:
        agg.receive(u, len(ups))
    assert [s for s, _ in agg._staged] == [u.state for u in ups]
    parallel, r_out = agg.aggregate(g, ups, cfg, 2)
    assert agg._staged == []  # dropped after the round
    assert list(parallel) == list(serial)
    for k in serial:
        assert torch.equal(parallel[k], serial[k]), k
    pancreas = [k for k in g if ".organs.pancreas." in k and k.startswith("student.")]
    assert pancreas and all(parallel[k] is g[k] for k in pancreas)  # nobody holds it: unchanged object
    assert r_out.metrics == s_out.metrics
    # A round below the threshold is not put at all.
    small = RayAggregator(serial_below_bytes=2**40)
    small.receive(ups[0], 2)
    assert small._staged == []


def test_pack_state_round_trip_per_dtype():
    from orchestration.ray_aggregation import pack_state, unpack_state

    state = {"a": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([3, 4], dtype=torch.int64),
             "b": torch.tensor(1.5), "c": torch.ones(0, 2)}
    flats, layout = pack_state(state)
    assert sorted(flats) == ["float32", "int64"] and flats["float32"].size == 7 and flats["int64"].size == 2
    back = unpack_state((flats, layout))
    assert set(back) == set(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    # Views of the flat arrays (no copy), and a key subset.
    assert back["a"].data_ptr() == flats["float32"].ctypes.data
    assert set(unpack_state((flats, layout), {"n", "zz"})) == {"n"}
