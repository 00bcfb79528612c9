"""Checkpoint folders: exact round-trip, fp32 exchange format, corruption and missing files detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedpanfm.checkpoint import CheckpointError, load_checkpoint, point_latest, read_checkpoint_file, save_checkpoint
from fedpanfm.config import config_from_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "student.w": torch.randn(3, 4, generator=g),
        "teacher.w": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "masker.count": torch.arange(5, dtype=torch.int64),
        "view": torch.randn(4, 6, generator=g).t(),  # non-contiguous
    }


def test_round_trip_is_exact_and_fp32(tmp_path: Path) -> None:
    cfg = tiny_config(["model.depth=3"])
    state = _state()
    path = save_checkpoint(tmp_path / "ck", state, cfg, {"epoch": 2, "loss": 1.5})
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "config.yaml", "meta.json", "model.safetensors"]
    loaded, cfg_dict, meta = load_checkpoint(path)
    assert set(loaded) == set(state)
    assert loaded["teacher.w"].dtype == torch.float32  # bf16 widened to the exchange format
    assert torch.equal(loaded["teacher.w"], state["teacher.w"].float())
    assert torch.equal(loaded["student.w"], state["student.w"])
    assert torch.equal(loaded["view"], state["view"])
    assert loaded["masker.count"].dtype == torch.int64 and torch.equal(loaded["masker.count"], state["masker.count"])
    assert meta == {"epoch": 2, "loss": 1.5}
    assert config_from_dict(cfg_dict).model.depth == 3
    # no temporary folder is left beside the checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_overwrite_replaces_whole_folder(tmp_path: Path) -> None:
    cfg = tiny_config()
    save_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)}, cfg, {"v": 1})
    save_checkpoint(tmp_path / "ck", {"b": torch.ones(3)}, cfg, {"v": 2})
    state, _, meta = load_checkpoint(tmp_path / "ck")
    assert list(state) == ["b"] and meta["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_a_file_in_the_way_is_refused_and_kept(tmp_path: Path) -> None:
    """A file where a checkpoint folder goes is not ours to delete: the write is refused, naming it."""
    (tmp_path / "ck").write_text("an operator's notes")
    with pytest.raises(FileExistsError, match=r"ck: a file, not a checkpoint folder, is in the way"):
        save_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)}, tiny_config(), {"v": 1})
    assert (tmp_path / "ck").read_text() == "an operator's notes"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "meta.json"])
def test_corrupted_file_is_named(tmp_path: Path, name: str) -> None:
    path = save_checkpoint(tmp_path / "ck", _state(), tiny_config(), {"epoch": 1})
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "meta.json", "SHA256SUMS"])
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    path = save_checkpoint(tmp_path / "ck", _state(), tiny_config(), {})
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path)


def test_extra_files_are_written_with_the_checkpoint_and_checked(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck", _state(), tiny_config(), {}, extra_files={"trainer.bin": b"abc" * 100})
    assert "trainer.bin" in (path / "SHA256SUMS").read_text()
    assert read_checkpoint_file(path, "trainer.bin") == b"abc" * 100
    with pytest.raises(CheckpointError, match="no other.bin"):
        read_checkpoint_file(path, "other.bin")
    data = bytearray((path / "trainer.bin").read_bytes())
    data[7] ^= 0x01
    (path / "trainer.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trainer.bin: checksum mismatch"):
        read_checkpoint_file(path, "trainer.bin")
    for bad in ("meta.json", "SHA256SUMS", "../x", ".hidden"):
        with pytest.raises(ValueError, match="not allowed"):
            save_checkpoint(tmp_path / "ck2", _state(), tiny_config(), {}, extra_files={bad: b""})
    assert not (tmp_path / "ck2").exists()


def test_meta_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta is not JSON"):
        save_checkpoint(tmp_path / "ck", {}, tiny_config(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_latest_link_follows_newest(tmp_path: Path) -> None:
    cfg = tiny_config()
    a = save_checkpoint(tmp_path / "epoch_1", {"x": torch.zeros(1)}, cfg, {"epoch": 1})
    b = save_checkpoint(tmp_path / "epoch_2", {"x": torch.ones(1)}, cfg, {"epoch": 2})
    point_latest(tmp_path / "latest", a)
    point_latest(tmp_path / "latest", b)
    _, _, meta = load_checkpoint(tmp_path / "latest")
    assert meta["epoch"] == 2
    assert json.loads((tmp_path / "latest" / "meta.json").read_text())["epoch"] == 2
    with pytest.raises(CheckpointError, match="missing checkpoint folder"):
        point_latest(tmp_path / "latest", tmp_path / "epoch_9")
