"""Item 5: server aggregation throughput (bytes of site updates reduced per second) against a
large memory copy measured in the same run, for the serial and the Ray aggregator.

The model is a real ``PanFMSSL`` key layout (so the organ / expert / shared groups, directors
and the server-EMA teacher all run) sized to about 100M student parameters; each of the sites'
updates carries what a site sends (``select_transfer``: the student, no teacher), i.e.
8 x ~400 MB in fp32. ``python -m bench.aggregation [--sites N] [--dim D] [--depth L]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from bench.machine import machine_copy
from bench.table import Row, check
from fedpanfm.config import ExperimentConfig, load_config
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.tensor_codec import state_nbytes
from fedpanfm.federation.transfer import select_transfer

TARGET = 0.40


def big_config(dim: int, depth: int) -> ExperimentConfig:
    """The default config at width ``dim`` and ``depth`` blocks (heads of 64 channels)."""
    return load_config(None, [f"model.dim={dim}", f"model.depth={depth}", f"model.heads={max(1, dim // 64)}",
                              "federation.ray.enabled=false"])


def site_updates(cfg: ExperimentConfig, global_state: dict[str, torch.Tensor], n: int) -> list[SiteUpdate]:
    """``n`` updates as sites send them: global + a per-site offset on every float tensor."""
    organs = cfg.data.organ_set()
    L, E = cfg.model.depth, cfg.model.dex.experts
    out = []
    for i in range(n):
        state = {k: (t + 0.01 * (i + 1) if t.is_floating_point() else t) for k, t in global_state.items()}
        gm = torch.full((L, E), 1.0 + i, dtype=torch.float64)
        sent, gm = select_transfer(state, gm, cfg)
        del state
        out.append(SiteUpdate(f"site{i}", sent, 10 + i, torch.full((len(organs),), 10.0 + i, dtype=torch.float64),
                              gm, torch.full((len(organs),), 1.0 / len(organs), dtype=torch.float64),
                              list(organs.names), {}, steps=10))
    return out


def measure(quick: bool, sites: int = 8, dim: int = 640, depth: int = 10) -> list[Row]:
    """Rows for item 5 (serial and Ray)."""
    import ray

    from orchestration.ray_aggregation import RayAggregator, SerialAggregator
    from orchestration.server_app import initial_state

    cfg = big_config(dim, depth)
    g = initial_state(cfg)
    student = sum(t.numel() for k, t in g.items() if k.startswith("student."))
    updates = site_updates(cfg, g, sites)
    nbytes = sum(state_nbytes(u.state) for u in updates)
    repeats = 3 if quick else 5
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        aggs = {"serial": SerialAggregator(), "ray": RayAggregator()}
        times: dict[str, list[float]] = {k: [] for k in aggs}
        cpu: list[float] = []  # process CPU seconds of the serial path (one thread: its own cost)
        copies: list[float] = []
        puts: list[float] = []
        # One untimed round: starts the Ray workers (imports) and maps the object store's pages
        # into every process once, as in any round after a federation's first.
        for u in updates:
            aggs["ray"].receive(u, sites)
        aggs["ray"].aggregate(g, updates, cfg, 1)
        for r in range(repeats):
            copies.append(machine_copy())
            for name in (list(aggs) if r % 2 == 0 else list(aggs)[::-1]):
                if name == "ray":
                    # What the strategy does as each reply is decoded (FedPanFM.decode_replies):
                    # the updates go into the object store before the aggregation starts.
                    t = time.perf_counter()
                    for u in updates:
                        aggs[name].receive(u, sites)
                    puts.append(time.perf_counter() - t)
                t, c = time.perf_counter(), time.process_time()
                state, _ = aggs[name].aggregate(g, updates, cfg, 1)
                times[name].append(time.perf_counter() - t)
                if name == "serial":
                    cpu.append(time.process_time() - c)
                del state
    finally:
        ray.shutdown()
    copy = statistics.median(copies)
    put = statistics.median(puts)
    rows = []
    for name, ts in times.items():
        sec = statistics.median(ts)
        ratio = nbytes / sec / copy
        staged = (f"; updates put into the object store at receipt ({put:.2f} s, not in this span)" if name == "ray" else
                  f"; per CPU-second {nbytes / statistics.median(cpu) / 1e9:.2f} GB/s = "
                  f"{nbytes / statistics.median(cpu) / copy:.3f} of the copy")
        staged += f"; best of {len(ts)} {nbytes / min(ts) / copy:.3f}"
        rows.append(Row(f"5 aggregation {name}", ratio, f">= {TARGET}", check(ratio, ">=", TARGET),
                        f"{nbytes / sec / 1e9:.2f} GB/s reduced ({sites} sites x {student / 1e6:.0f}M params, "
                        f"{sec:.2f} s) / copy {copy / 1e9:.2f} GB/s{staged}",
                        {"seconds": sec, "bytes": nbytes, "copy_Bps": copy, "params_student": student, "sites": sites,
                         "all_seconds": ts, **({"put_seconds": put} if name == "ray" else {"cpu_seconds": cpu})}))
    sec = statistics.median(times["ray"]) + put
    rows.append(Row("5 aggregation ray, put included", nbytes / sec / copy, "", None,
                    f"{nbytes / sec / 1e9:.2f} GB/s ({put:.2f} s put + {sec - put:.2f} s aggregation) / copy "
                    f"{copy / 1e9:.2f} GB/s: the round's cost when every reply arrives at once",
                    {"seconds": sec, "put_seconds": put, "bytes": nbytes, "copy_Bps": copy}))
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.table import render

    p = argparse.ArgumentParser(prog="python -m bench.aggregation", description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(render(measure(a.quick, a.sites, a.dim, a.depth)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
