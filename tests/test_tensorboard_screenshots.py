"""The README-screenshot tool's pure parts (bench/tensorboard_screenshots.py); the tool itself
needs Chromium and a served TensorBoard and is not run in CI."""

from __future__ import annotations

import re
import socket
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import tensorboard_screenshots as shots


def test_free_port_is_bindable_on_loopback() -> None:
    port = shots.free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((shots.HOST, port))


def test_dashboard_url_carries_the_tag_regex_and_smoothing_in_the_hash() -> None:
    regex = r"^(probe/auroc_macro|train/loss)$"
    url = shots.dashboard_url(6006, "scalars", regex)
    base, _, fragment = url.partition("#")
    assert base == "http://127.0.0.1:6006/"
    name, *params = fragment.split("&")
    fields = dict(urllib.parse.parse_qsl("&".join(params)))
    assert name == "scalars" and fields == {"tagFilter": regex, "_smoothingWeight": "0"}
    assert re.match(fields["tagFilter"], "train/loss") and not re.match(fields["tagFilter"], "train/loss/dino")
    assert shots.dashboard_url(1, "images", smoothing=0.5).endswith("/#images&_smoothingWeight=0.5")
    with pytest.raises(ValueError, match="smoothing"):
        shots.dashboard_url(1, "scalars", smoothing=1.0)
    with pytest.raises(ValueError, match="dashboard"):
        shots.dashboard_url(1, "scalars&x=1")


def test_missing_chromium_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends chromium"):
        shots.find_chromium()
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        shots.find_chromium("nope")
    assert shots.main(["--run", str(tmp_path)]) == 2  # before anything is started
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert shots.find_chromium() == str(fake)


def test_chromium_command_screenshots_the_url_in_the_given_profile(tmp_path: Path) -> None:
    cmd = shots.chromium_command("chromium", tmp_path / "p", "http://127.0.0.1:1/#scalars",
                                 png=tmp_path / "a.png", window=(800, 600), budget_ms=5000)
    assert cmd[0] == "chromium" and cmd[-1] == "http://127.0.0.1:1/#scalars"
    assert {"--headless=new", f"--user-data-dir={tmp_path / 'p'}", "--window-size=800,600",
            "--virtual-time-budget=5000", f"--screenshot={tmp_path / 'a.png'}"} <= set(cmd)


def test_fit_png_shrinks_to_the_byte_limit_keeping_the_aspect(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw.png"
    Image.fromarray(rng.integers(0, 256, (300, 600, 3), dtype=np.uint8)).save(raw)  # noise: incompressible
    dest = tmp_path / "out" / "shot.png"
    size = shots.fit_png(raw, dest, max_bytes=60_000)
    assert size == dest.stat().st_size <= 60_000
    with Image.open(dest) as img:
        assert img.mode == "P" and img.width < 600 and img.width / img.height == pytest.approx(2.0, rel=0.01)
    with pytest.raises(RuntimeError, match="limit 100"):
        shots.fit_png(raw, dest, max_bytes=100)
