"""``fedpanfm cohort synth`` and ``fedpanfm cohort inspect`` through ``fedpanfm.cli.main``."""

from __future__ import annotations

import re

import yaml
from conftest import TINY, make_site, tiny_config

from fedpanfm.cli import main
from fedpanfm.data.dataset import list_sites
from fedpanfm.data.manifest import MANIFEST_NAME


def _config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def _row(out: str, site: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.split() and line.split()[0] == site)
    return line.split()


def test_inspect_cohort_prints_each_site_and_the_total(tmp_path, capsys):
    cfg = tiny_config()
    cohort = tmp_path / "cohort"
    make_site(cohort / "site_a", cfg, {"a0": ["brain", "heart"], "a1": ["heart"]})
    make_site(cohort / "site_b", cfg, {"b0": ["liver"], "b1": ["heart"], "b2": ["heart", "brain"]})
    assert main(["cohort", "inspect", str(cohort), "--config", _config_file(tmp_path)]) == 0
    out = capsys.readouterr().out
    # site, subjects, skipped, then "n (x% miss)" per organ in vocabulary order (brain, heart, ...)
    assert _row(out, "site_a")[:7] == ["site_a", "2", "0", "1", "(50%", "miss)", "2"]
    assert _row(out, "site_b")[:4] == ["site_b", "3", "0", "1"]
    total = _row(out, "total")
    assert total[:4] == ["total", "5", "0", "2"] and total[6] == "4" and total[7] == "(20%"
    # make_site labels: diabetes = k % 2 (a1, b1 positive); stroke known only for even k.
    labels = out[out.index("label prevalence"):]
    assert re.search(r"site_a\s+1/2 \(50%\)\s+0/1 \(0%\)", labels)
    assert re.search(r"total\s+2/5 \(40%\)\s+0/3 \(0%\)", labels)


def test_inspect_one_site_folder_and_skip_count(tmp_path, capsys):
    cfg = tiny_config()
    site = tmp_path / "site_a"
    make_site(site, cfg, {"a0": ["brain"], "a1": ["heart"]})
    (site / "img" / "a1_heart.nii.gz").unlink()
    args = ["cohort", "inspect", str(site), "--config", _config_file(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "site 'site_a'" in err and "row 3, file img/a1_heart.nii.gz" in err and "not found" in err
    assert main(args + ["--set", "data.on_bad=skip"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "site_a")[:3] == ["site_a", "1", "1"]
    assert "total" not in out.split()
    assert "skipped subjects (1): site_a/a1" in out


def test_synth_then_inspect(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    cfg_file = _config_file(tmp_path)
    rc = main(["cohort", "synth", "--out", str(out_dir), "--sites", "2", "--subjects", "3", "--seed", "5",
               "--config", cfg_file])
    assert rc == 0
    sites = list_sites(out_dir)
    assert len(sites) == 2 and all((s / MANIFEST_NAME).is_file() for s in sites)
    capsys.readouterr()
    assert main(["cohort", "inspect", str(out_dir), "--config", cfg_file]) == 0
    out = capsys.readouterr().out
    assert _row(out, "total")[:3] == ["total", "6", "0"]
