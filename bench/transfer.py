"""Item 6: bytes exchanged per site per round, by transfer option (quickstart model).

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
    """Rows for item 6: downlink, uplink fp32 (full state and what is read), bf16, sparse."""
    from bench.step_time import make_batches
    from fedpanfm.config import load_config
    from fedpanfm.federation.message import state_to_arrayrecord
    from fedpanfm.federation.transfer import select_transfer
    from fedpanfm.train.engine import LocalTrainer
    from orchestration.server_app import initial_state

    base = ["synth.sites=1", "train.progress=false"]
    cfg = load_config(QUICKSTART, base)
    trainer = LocalTrainer(cfg)
    result = trainer.fit(make_batches(cfg, 3 if quick else 8), epochs=1, total_steps=100)
    state = trainer.export_state()
    down = state_to_arrayrecord(initial_state(cfg)).count_bytes()
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
        sizes[name] = state_to_arrayrecord(sent, c.federation.transfer_dtype).count_bytes()
    used = int((result.gate_mass > 0).sum())
    total = result.gate_mass.numel()
    rows = [Row("6 bytes/site/round: downlink", down / 1e3, "", None, "kB, global fp32 state (server -> site)",
                {"bytes": down}),
            Row("6 uplink before (full state)", full / 1e3, "", None, "kB, student + teacher fp32 (previous protocol)",
                {"bytes": full})]
    for name, b in sizes.items():
        ratio = b / sizes["fp32"]
        target, ok = ("<= 0.5", check(ratio, "<=", 0.5 + 0.01)) if name == "bf16" else ("", None)
        rows.append(Row(f"6 uplink {name} / fp32", ratio, target, ok,
                        f"{b / 1e3:.1f} kB vs {sizes['fp32'] / 1e3:.1f} kB (experts routed: {used}/{total})",
                        {"bytes": b, "experts_used": used, "experts_total": total}))
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
