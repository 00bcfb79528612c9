"""`fedpanfm evaluate` end to end, missing-organ conditions, attention balance, probe_auroc."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.checkpoint import save_checkpoint
from fedpanfm.cli import main
from fedpanfm.data.dataset import pooled_dataset
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.evaluation.attention import attention_balance, normalised_entropy
from fedpanfm.evaluation.embed import Embeddings, collate_dataset, random_encoder
from fedpanfm.evaluation.probe import probe_auroc
from fedpanfm.evaluation.robustness import random_drop_mask
from fedpanfm.model.meta_arch import PanFMSSL
from fedpanfm.tb import read_scalars

ORGANS = tiny_config().data.organ_set().names


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-site x 10-subject synthetic cohort at the tiny grids and a fresh PanFMSSL checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(["synth.sites=4", "synth.subjects=10"])
    generate_cohort(root / "cohort", cfg)
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", PanFMSSL(cfg).state_dict(), cfg, {"kind": "test"})
    return root / "cohort", root / "ckpt"


def cfg_dim() -> int:
    return tiny_config().model.dim


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_evaluate_command_end_to_end(cohort, tmp_path):
    cohort_dir, ckpt = cohort
    out = tmp_path / "out"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--cohort", str(cohort_dir), "--out", str(out), "--seed", "3",
               "--set", "evaluation.bootstrap=100", "--set", "evaluation.random_draws=2"])
    assert rc == 0
    for name in ("probes.csv", "robustness.csv", "attention.csv", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("robustness_k.png", "organ_drop.png", "attention_balance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    summary = json.loads((out / "summary.json").read_text())
    test_ids = set(summary["split"]["test"])
    assert summary["meta"]["test"] == len(test_ids) and summary["meta"]["subjects"] == 40
    # The cohort is synthetic, so its latent factors are known and their decodability is reported.
    fac = summary["factors"]
    assert set(fac["r2"]) >= {"body_size", "renal", "age"} and 1.0 <= fac["participation_ratio"] <= cfg_dim()
    assert fac["n_test"] == len(test_ids) and "What the embedding encodes" in (out / "report.md").read_text()
    # organ sets of the test subjects, read independently from the cohort
    cfg = tiny_config()
    ds = pooled_dataset(cohort_dir, cfg)
    organs_of = {}
    for part in ds.datasets:
        for i, sid in enumerate(part.subject_ids):
            if sid in test_ids:
                organs_of[sid] = set(part.organs_of(i))

    rows = {r["condition"]: r for r in _csv(out / "robustness.csv")}
    expected = ["full"] + [f"drop:{o}" for o in ORGANS] + [f"random_k:{k}" for k in range(1, 7)] + [f"only:{o}" for o in ORGANS]
    assert list(rows) == expected
    assert int(rows["full"]["n"]) == len(test_ids) and float(rows["full"]["drop"]) == 0.0
    for o in ORGANS:
        assert int(rows[f"drop:{o}"]["n"]) == sum(1 for s in organs_of.values() if s - {o})
        assert int(rows[f"only:{o}"]["n"]) == sum(1 for s in organs_of.values() if o in s)
    for k in range(1, 7):
        r = rows[f"random_k:{k}"]
        n = sum(1 for s in organs_of.values() if len(s) > k)  # subjects losing every organ are excluded
        assert int(r["n"]) == n and int(r["n_excluded"]) == len(test_ids) - n

    probes = _csv(out / "probes.csv")
    assert probes[-1]["label"] == "macro"
    assert float(probes[-1]["auroc"]) == pytest.approx(float(rows["full"]["macro_auroc"]), abs=1e-5)
    attention = _csv(out / "attention.csv")
    assert [a["organ"] for a in attention] == list(ORGANS)
    pooled = [float(a["pooled_share"]) for a in attention]
    assert sum(pooled) == pytest.approx(1.0, abs=1e-5)
    for a in attention:  # the inference-time column is the robustness table's drop:<organ>
        assert float(a["inference_drop"]) == pytest.approx(float(rows[f"drop:{a['organ']}"]["drop"]), abs=1e-5)
    for col in ("info_share", "inference_share"):
        shares = [float(a[col]) for a in attention]
        assert all(math.isnan(x) for x in shares) or sum(shares) == pytest.approx(1.0, abs=1e-5)
    md = (out / "report.md").read_text()
    assert "## Missing-organ robustness" in md and "random_k:6" in md and "only:pancreas" in md

    tb = read_scalars(out / "evaluation")
    assert [s for s, _ in tb["robustness/random_k/macro"]][0] == 0
    assert tb["attention/entropy"][0][1] == pytest.approx(summary["attention"]["entropy"], abs=1e-5)
    for o, a in zip(ORGANS, attention):
        if a["attn_share"] != "nan":
            assert tb[f"attention/share/{o}"][0][1] == pytest.approx(float(a["attn_share"]), abs=1e-5)
    for p in probes[:-1]:
        if p["auroc"] != "nan":
            assert tb[f"probe/auroc/{p['label']}"][0][1] == pytest.approx(float(p["auroc"]), abs=1e-5)


def test_evaluate_rejects_config_with_checkpoint(cohort, tmp_path, capsys):
    cohort_dir, ckpt = cohort
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--cohort", str(cohort_dir), "--config", "x.yaml"])
    assert rc == 1 and "carries its own config" in capsys.readouterr().err
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--cohort", str(cohort_dir)])
    assert rc == 1 and "checkpoint folder not found" in capsys.readouterr().err


def test_probe_auroc_hook_is_deterministic(cohort):
    cohort_dir, _ = cohort
    cfg = tiny_config()
    batches = collate_dataset(pooled_dataset(cohort_dir, cfg), cfg, batch_size=16)
    encoder = random_encoder(cfg, seed=0)
    encoder.train()
    a = probe_auroc(encoder, batches, cfg, seed=1)
    b = probe_auroc(encoder, batches, cfg, seed=1)
    assert encoder.training  # the caller's mode is restored
    assert a == b and a["probe/n_test"] == 12.0
    assert all(math.isfinite(v) for v in a.values())
    assert 0.0 <= a["probe/auroc_macro"] <= 1.0 and a["probe/labels_scored"] >= 1


def test_drop_per_subject_matches_drop_organs_and_excludes_empty_subjects(tiny_cfg):
    sets = [["brain", "heart"], ["heart"], ["liver", "kidney", "heart"]]
    batch = make_batch(tiny_cfg, sets)
    heart = list(ORGANS).index("heart")
    uniform = torch.zeros(3, len(ORGANS), dtype=torch.bool)
    uniform[:, heart] = True
    a, b = batch.drop_per_subject(uniform), batch.drop_organs(["heart"])
    assert a.subject_ids == b.subject_ids == ["s0", "s2"]
    assert torch.equal(a.present, b.present)
    for o in b.images:
        assert torch.equal(a.images[o], b.images[o]) and torch.equal(a.index[o], b.index[o])
    drop = torch.zeros(3, len(ORGANS), dtype=torch.bool)
    drop[0, list(ORGANS).index("brain")] = True  # s0 keeps heart
    drop[2, heart] = True  # s2 keeps liver, kidney
    c = batch.drop_per_subject(drop)
    assert c.subject_ids == ["s0", "s1", "s2"] and "brain" not in c.images
    assert c.index["heart"].tolist() == [0, 1]
    assert torch.equal(c.images["heart"], batch.images["heart"][:2])


def test_random_drop_mask_draws_only_present_organs():
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for k in (1, 2, 3):
        m = random_drop_mask(present, k, g)
        assert not (m & ~present).any()
        assert m.sum(1).tolist() == [min(k, 3), 1, k]


def test_entropy_and_attention_balance_by_hand():
    shares = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.0, 0.1], [1.0, 0.0, 0.0]])
    present = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    h = normalised_entropy(shares, present)
    assert h[0] == pytest.approx(1.0)
    assert h[1] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2))
    assert math.isnan(h[2])  # one organ: undefined
    emb = Embeddings(["a", "b", "c"], torch.zeros(3, 4), shares, present, torch.zeros(3, 0), (), ("x", "y", "z"))
    bal = attention_balance(emb, {"x": 0.3, "y": -0.1, "z": 0.1})
    x, y, z = bal.organs
    assert x.attn_share == pytest.approx(0.8) and y.attn_share == pytest.approx(0.5)
    assert z.attn_share == pytest.approx(0.1)
    assert x.pooled_share == pytest.approx(2.4 / 3) and sum(o.pooled_share for o in bal.organs) == pytest.approx(1.0)
    assert x.relative == pytest.approx((1.0 + 1.8 + 1.0) / 3)  # |P_b| * share, mean over subjects with x
    assert (x.info_share, y.info_share, z.info_share) == pytest.approx((0.75, 0.0, 0.25))
    assert bal.entropy == pytest.approx(float(h[:2].mean())) and bal.n_entropy_subjects == 2
