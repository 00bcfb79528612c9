"""Checkpoints: a folder with weights (safetensors), config, metadata and checksums.

Layout of a checkpoint folder::

    model.safetensors   fp32 tensors (the exchange format; bf16 is widened), no pickling
    config.yaml         ExperimentConfig.to_yaml()
    meta.json           free-form metadata (step, epoch, round, metrics ...)
    SHA256SUMS          "<sha256>  <file name>" per file above

A checkpoint is written into a temporary folder beside its destination, every file is fsynced,
and the folder is then renamed into place, so a reader never sees a half-written checkpoint.
Replacing an existing folder has no crash window: on Linux the two folders are swapped in one
atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is first moved aside into
``.<name>.old-*/ckpt`` and :func:`recover_checkpoint` (run before every write and read) moves it
back if a crash came between the two renames.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedpanfm.config import ExperimentConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
SUMS = "SHA256SUMS"
_PAYLOAD = (WEIGHTS, CONFIG, META)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing a file or a file does not match its checksum."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; not every platform allows opening a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_folders(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or file system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def recover_checkpoint(path_dir: Path) -> bool:
    """Undo a replace interrupted between its two renames (the fallback of :func:`save_checkpoint`):
    when ``path_dir`` is missing and ``.<name>.old-*/ckpt`` holds the previous checkpoint, move it
    back. Returns True when something was recovered.

    Args:
        path_dir: a checkpoint folder path.
    """
    path_dir = Path(path_dir)
    if path_dir.exists() or not path_dir.parent.is_dir():
        return False
    for old in sorted(path_dir.parent.glob(f".{path_dir.name}.old-*")):
        if (old / "ckpt").is_dir():
            os.replace(old / "ckpt", path_dir)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(path_dir.parent)
            return True
    return False


def _exchange_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint state key {key!r}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        out[key] = t.contiguous()
    return out


def save_checkpoint(path_dir: Path, state: dict[str, torch.Tensor], cfg: ExperimentConfig, meta: dict[str, Any],
                    extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write a checkpoint folder atomically; an existing folder at ``path_dir`` is replaced.

    Args:
        path_dir: the checkpoint folder to create (its parent is created if needed).
        state: tensor state dict (e.g. ``LocalTrainer.export_state()``); floating tensors are
            stored as fp32.
        cfg: the experiment config, stored as YAML so the checkpoint can be rebuilt.
        meta: JSON-serialisable metadata (step, epoch, metrics ...).
        extra_files: file name -> bytes written into the same folder, checksummed and replaced
            with it (read back with :func:`read_checkpoint_file`).

    Returns:
        ``path_dir``.
    """
    extra = dict(extra_files or {})
    clash = sorted(set(extra) & {*_PAYLOAD, SUMS} | {n for n in extra if Path(n).name != n or n.startswith(".")})
    if clash:
        raise ValueError(f"checkpoint {path_dir}: extra file name(s) {', '.join(clash)} not allowed")
    path_dir = Path(path_dir)
    path_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(path_dir)
    if path_dir.is_symlink() or (path_dir.exists() and not path_dir.is_dir()):
        # Not a checkpoint of ours: replacing it would delete something we did not write.
        raise FileExistsError(f"checkpoint {path_dir}: a file, not a checkpoint folder, is in the way; "
                              "move it elsewhere and write (or resume) again")
    for stale in path_dir.parent.glob(f".{path_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crashed write (or the old half of a swap)
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"checkpoint {path_dir}: meta is not JSON-serialisable: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{path_dir.name}.tmp-", dir=path_dir.parent))
    try:
        save_file(_exchange_tensors(state), str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(cfg.to_yaml())
        (tmp / META).write_text(meta_text + "\n")
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        sums = "".join(f"{_sha256(tmp / name)}  {name}\n" for name in (*_PAYLOAD, *extra))
        (tmp / SUMS).write_text(sums)
        for name in (*_PAYLOAD, *extra, SUMS):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if path_dir.exists():
            # os.replace cannot replace a non-empty folder. Swapped atomically, path_dir always
            # holds a complete checkpoint; tmp then holds the old one (removed below).
            if _swap_folders(tmp, path_dir):
                _fsync_dir(path_dir.parent)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{path_dir.name}.old-", dir=path_dir.parent))
                os.replace(path_dir, old / "ckpt")  # a crash here: recover_checkpoint moves it back
                os.replace(tmp, path_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path_dir)
        _fsync_dir(path_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path_dir


def _read_sums(path_dir: Path) -> dict[str, str]:
    sums_path = path_dir / SUMS
    if not sums_path.is_file():
        raise CheckpointError(f"{sums_path}: missing checksum file")
    sums: dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise CheckpointError(f"{sums_path}: line {n} is not '<sha256>  <file>': {line!r}")
        sums[parts[1]] = parts[0]
    missing = [name for name in _PAYLOAD if name not in sums]
    if missing:
        raise CheckpointError(f"{sums_path}: no checksum for {', '.join(missing)}")
    return sums


def _verified(path_dir: Path, name: str, sums: Mapping[str, str]) -> Path:
    """``path_dir / name`` after checking it exists and matches its recorded checksum."""
    p = path_dir / name
    if not p.is_file():
        raise CheckpointError(f"{p}: missing checkpoint file")
    if _sha256(p) != sums[name]:
        raise CheckpointError(f"{p}: checksum mismatch (file corrupted or changed after saving)")
    return p


def read_checkpoint_file(path_dir: Path, name: str) -> bytes:
    """The bytes of an ``extra_files`` entry of :func:`save_checkpoint`, checked against SHA256SUMS.

    Raises:
        CheckpointError: the checkpoint has no such file, or it fails its checksum.
    """
    path_dir = Path(path_dir)
    sums = _read_sums(path_dir)
    if name not in sums:
        raise CheckpointError(f"{path_dir}: no {name} in this checkpoint")
    return _verified(path_dir, name, sums).read_bytes()


def load_checkpoint(path_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read and verify a checkpoint folder.

    Args:
        path_dir: a folder written by :func:`save_checkpoint`.

    Returns:
        ``(state, cfg_dict, meta)``: fp32 CPU tensors, the config as a plain mapping (build an
        ``ExperimentConfig`` with ``config_from_dict``), and the metadata.

    Raises:
        CheckpointError: naming the file that is missing, fails its checksum, or cannot be parsed.
    """
    path_dir = Path(path_dir)
    recover_checkpoint(path_dir)
    if not path_dir.is_dir():
        raise CheckpointError(f"{path_dir}: checkpoint folder not found")
    sums = _read_sums(path_dir)
    for name in _PAYLOAD:
        _verified(path_dir, name, sums)
    try:
        state = load_file(str(path_dir / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path_dir / WEIGHTS}: cannot read tensors: {exc}") from None
    try:
        cfg_dict = yaml.safe_load((path_dir / CONFIG).read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path_dir / CONFIG}: not valid YAML: {exc}") from None
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{path_dir / CONFIG}: expected a mapping at the top level")
    try:
        meta = json.loads((path_dir / META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path_dir / META}: not valid JSON: {exc}") from None
    return state, cfg_dict, meta


def point_latest(link: Path, target: Path) -> Path:
    """Make ``link`` a relative symlink to the checkpoint folder ``target``, replacing it atomically.

    Args:
        link: the link path, e.g. ``<run_dir>/checkpoints/latest``.
        target: an existing checkpoint folder in the same parent folder as ``link``.
    """
    link, target = Path(link), Path(target)
    if not target.is_dir():
        raise CheckpointError(f"{target}: cannot point {link.name} at a missing checkpoint folder")
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    return link


__all__ = ["CheckpointError", "load_checkpoint", "point_latest", "recover_checkpoint", "save_checkpoint"]
