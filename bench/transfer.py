"""Item 6: bytes exchanged per site per round, by transfer option (quickstart model).

Downlink fp32 / bf16 (the global state), uplink fp32 / bf16 deltas (``new - received``, what a
bf16 site sends) / sparse experts, and both directions together: the item's target is bf16 at
half the fp32 bytes.

The gate mass that decides which experts a sparse site leaves out comes from a real local
epoch (LocalTrainer on a synthetic site), so "experts used" is what training actually routed.
Bytes are the ArrayRecord payloads as Flower counts them (``count_bytes``: array bytes with
their .npy headers, plus key names). ``python -m bench.transfer``.
"""

from __future__ import annotations

from pathlib import Path

from bench.table import Row, check

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def measure(quick: bool) -> list[Row]:
    """Rows for item 6: downlink fp32 / bf16, uplink fp32 (full state and what is read), bf16
    deltas, sparse, the bytes exchanged per site per round both ways, and the bf16 rounding error
    of the uplink (deltas vs plain bf16 weights) relative to the round's update."""
    import torch

    from bench.step_time import make_batches
    from fedpanfm.config import load_config
    from fedpanfm.federation.tensor_codec import arrayrecord_to_state, state_to_arrayrecord
    from fedpanfm.federation.transfer import select_transfer
    from fedpanfm.train.engine import LocalTrainer
    from orchestration.server_app import initial_state

    base = ["synth.sites=1", "train.progress=false"]
    cfg = load_config(QUICKSTART, base)
    trainer = LocalTrainer(cfg)
    master = trainer.export_state()
    # As under a bf16 downlink: the site trains from the bf16-rounded global weights.
    received = arrayrecord_to_state(state_to_arrayrecord(master, "bf16"))
    trainer.load_state(received)
    result = trainer.fit(make_batches(cfg, 3 if quick else 8), epochs=1, total_steps=100)
    state = trainer.export_state()
    start = initial_state(cfg)
    down = {dt: state_to_arrayrecord(start, dt).count_bytes() for dt in ("fp32", "bf16")}
    full = state_to_arrayrecord(state).count_bytes()
    variants = {
        "fp32": [],
        "bf16": ["federation.transfer_dtype=bf16"],
        "bf16+sparse": ["federation.transfer_dtype=bf16", "federation.sparse_experts=true"],
        "bf16+sparse(min 10%)": ["federation.transfer_dtype=bf16", "federation.sparse_experts=true",
                                 "federation.sparse_expert_min_share=0.1"],
    }
    sizes = {}
    for name, sets in variants.items():
        c = load_config(QUICKSTART, base + sets)
        sent, gm = select_transfer(state, result.gate_mass, c)
        sizes[name] = state_to_arrayrecord(sent, c.federation.transfer_dtype, received).count_bytes()
    used = int((result.gate_mass > 0).sum())
    total = result.gate_mass.numel()
    rows = [Row("6 bytes/site/round: downlink fp32", down["fp32"] / 1e3, "", None,
                "kB, global fp32 state (server -> site)", {"bytes": down["fp32"]}),
            Row("6 downlink bf16 / fp32", down["bf16"] / down["fp32"], "", None,
                f"{down['bf16'] / 1e3:.1f} kB vs {down['fp32'] / 1e3:.1f} kB (global state as bf16)",
                {"bytes": down["bf16"]}),
            Row("6 uplink before (full state)", full / 1e3, "", None, "kB, student + teacher fp32 (previous protocol)",
                {"bytes": full})]
    for name, b in sizes.items():
        ratio = b / sizes["fp32"]
        target, ok = ("<= 0.5", check(ratio, "<=", 0.5 + 0.01)) if name == "bf16" else ("", None)
        # bf16 rows are bf16 deltas against what the site received (the sparse ones too)
        label = "bf16(delta)" if name == "bf16" else name
        rows.append(Row(f"6 uplink {label} / fp32", ratio, target, ok,
                        f"{b / 1e3:.1f} kB vs {sizes['fp32'] / 1e3:.1f} kB (experts routed: {used}/{total})",
                        {"bytes": b, "experts_used": used, "experts_total": total}))
    fp32_both, bf16_both = down["fp32"] + sizes["fp32"], down["bf16"] + sizes["bf16"]
    ratio = bf16_both / fp32_both
    rows.append(Row("6 exchanged (down + up) bf16 / fp32", ratio, "<= 0.5", check(ratio, "<=", 0.5 + 0.01),
                    f"{bf16_both / 1e3:.1f} kB vs {fp32_both / 1e3:.1f} kB per site per round",
                    {"bytes_bf16": bf16_both, "bytes_fp32": fp32_both}))
    # The uplink's bf16 rounding error relative to the round's update, over the student's weights
    # (buffers such as masker counts change by whole units and would dominate the norms): the
    # delta rounds new - received, plain bf16 rounds the weights themselves.
    keys = [k for k in select_transfer(state, result.gate_mass, cfg)[0]
            if k.startswith("student.") and state[k].is_floating_point()]
    upd = torch.cat([(state[k] - received[k]).flatten() for k in keys])
    err_delta = upd.bfloat16().float() - upd
    err_plain = torch.cat([(state[k].bfloat16().float() - state[k]).flatten() for k in keys])
    e_d, e_p = float(err_delta.norm() / upd.norm()), float(err_plain.norm() / upd.norm())
    rows.append(Row("6 uplink bf16 error / update: delta", e_d, "", None,
                    f"L2 of the rounding error / L2 of new - received, student: delta {e_d:.1e}, "
                    f"plain bf16 weights {e_p:.2f} ({e_p / e_d:.0f}x)", {"delta": e_d, "plain": e_p}))
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.table import render

    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(render(measure(a.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
