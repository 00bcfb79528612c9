"""Resources and devices: what a site actor reserves on Ray, the trainer's CUDA / bf16 choice
(mocked: no GPU here; nothing in this file ran on a GPU) and where the server aggregates."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.config import ConfigError
from fedpanfm.train import distributed
from fedpanfm.train.distributed import autocast_dtype, init_single_process
from orchestration.ray_aggregation import SerialAggregator, make_aggregator, server_device
from orchestration.ray_cluster import site_resources

CPU_NODE = {"CPU": 4.0}
GPU_NODE = {"CPU": 8.0, "GPU": 2.0}


def cfg_with(*overrides: str):
    return tiny_config(list(overrides))


@pytest.mark.parametrize("overrides, nodes, want", [
    ((), [CPU_NODE], {"num_cpus": 1.0, "num_gpus": 0.0}),  # auto, no GPU: CPU sites
    (("device=auto", "synth.sites=8"), [GPU_NODE, GPU_NODE], {"num_cpus": 1.0, "num_gpus": 0.5}),  # 8 sites, 4 GPUs
    (("device=auto", "synth.sites=3"), [GPU_NODE, GPU_NODE], {"num_cpus": 1.0, "num_gpus": 1.0}),  # more GPUs than sites
    (("device=auto", "synth.sites=7"), [{"CPU": 8.0, "GPU": 3.0}], {"num_cpus": 1.0, "num_gpus": 1 / 3}),
    (("device=cpu",), [GPU_NODE], {"num_cpus": 1.0, "num_gpus": 0.0}),  # auto with device cpu: no GPU held
    (("device=cuda", "federation.ray.site_gpus=0.25", "federation.ray.site_cpus=0.5"), [GPU_NODE],
     {"num_cpus": 0.5, "num_gpus": 0.25}),
])
def test_site_resources(overrides, nodes, want):
    got = site_resources(cfg_with(*overrides), nodes)
    assert got == pytest.approx(want)
    if got["num_gpus"]:
        # Flower's actor count per node (GPUs / fraction) is what Ray packs on the devices: k per GPU.
        per_gpu = round(1 / got["num_gpus"]) if got["num_gpus"] < 1 else 1
        for n in nodes:
            assert int(n["GPU"] / got["num_gpus"]) == int(n["GPU"]) * per_gpu


@pytest.mark.parametrize("overrides, nodes, match", [
    (("device=cuda",), [CPU_NODE], "device: cuda, but the site actors get no GPU"),
    (("device=auto", "federation.ray.site_gpus=0.5"), [CPU_NODE], "has no GPU"),
    (("device=cpu", "federation.ray.site_gpus=1"), [GPU_NODE], "never use"),
    (("federation.ray.site_cpus=6",), [CPU_NODE, CPU_NODE], "no Ray node has that much"),
])
def test_site_resources_errors_name_the_key(overrides, nodes, match):
    with pytest.raises(ConfigError, match=match):
        site_resources(cfg_with(*overrides), nodes)


@pytest.mark.parametrize("value, ok", [(-1, True), (0, True), (1, True), (0.5, True), (0.3333, True), (0.1, True),
                                       (0.4, False), (0.75, False), (-0.5, False), (2, False)])
def test_site_gpus_must_pack_whole_sites_per_gpu(value, ok):
    if ok:
        assert cfg_with(f"federation.ray.site_gpus={value}").federation.ray.site_gpus == value
    else:
        with pytest.raises(ConfigError, match="federation.ray.site_gpus"):
            cfg_with(f"federation.ray.site_gpus={value}")


def test_bf16_setting_is_typed():
    assert cfg_with().deepspeed.bf16 == "auto"
    assert cfg_with("deepspeed.bf16=false").deepspeed.bf16 is False
    with pytest.raises(ConfigError, match="deepspeed.bf16"):
        cfg_with("deepspeed.bf16=1")


@pytest.mark.parametrize("setting, device, supported, want", [
    ("auto", "cpu", True, None),
    ("auto", "cuda", True, torch.bfloat16),
    ("auto", "cuda", False, None),
    (True, "cpu", False, torch.bfloat16),
    (True, "cuda", True, torch.bfloat16),
    (False, "cuda", True, None),
])
def test_autocast_dtype(monkeypatch, setting, device, supported, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert autocast_dtype(setting, torch.device(device)) is want


def test_bf16_true_on_a_gpu_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="Tesla V100 has no native bf16"):
        autocast_dtype(True, torch.device("cuda", 0))


def test_cuda_trainer_gets_nccl_and_the_cuda_accelerator(monkeypatch):
    # The CUDA path of the site's process group, with torch.distributed mocked: what would run on a GPU.
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    for key in ("DS_ACCELERATOR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "")  # so that the test's end restores this process's values (or none)
        monkeypatch.delenv(key)
    init_single_process(torch.device("cuda", 0))
    assert [c["backend"] for c in calls] == ["nccl"] and calls[0]["world_size"] == 1
    assert os.environ["DS_ACCELERATOR"] == "cuda" and os.environ["LOCAL_RANK"] == "0"
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    assert distributed.pick_device("auto") == torch.device("cuda", 0)


def test_server_device_selection(monkeypatch):
    assert server_device(cfg_with()) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert server_device(cfg_with("federation.server_device=auto")) == torch.device("cuda", 0)
    assert server_device(cfg_with("federation.server_device=cpu")) == torch.device("cpu")
    # DP noise comes from a CPU generator: a private round stays on CPU whatever the setting.
    assert server_device(cfg_with("federation.server_device=cuda", "federation.dp.enabled=true")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        server_device(cfg_with("federation.server_device=cuda"))


def test_aggregation_on_a_named_device_equals_the_plain_path():
    # The device path (copy in, torch default device, copy back) on CPU: same state, same outcome.
    cfg = cfg_with()
    g = global_model_state(cfg)
    ups = [fake_site_update(cfg, g, "a", 6, organ_subjects=[6, 6, 0, 6, 6, 0, 0], seed=1),
           fake_site_update(cfg, g, "b", 4, seed=2)]
    prev = torch.rand(7, dtype=torch.float64)
    plain, p_out = SerialAggregator().aggregate(g, ups, cfg, 2, prev)
    placed, d_out = SerialAggregator(torch.device("cpu")).aggregate(g, ups, cfg, 2, prev)
    assert list(placed) == list(plain)
    for k in plain:
        assert torch.equal(placed[k], plain[k]) and placed[k].device.type == "cpu", k
    assert d_out.metrics == p_out.metrics and torch.equal(d_out.saliency, p_out.saliency)
    assert isinstance(make_aggregator(cfg_with("federation.ray.enabled=false")), SerialAggregator)
