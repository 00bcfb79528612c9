"""Run DeepSpeed outside its launcher: the site's process group and the device choice.

DeepSpeed expects its launcher to have set the rank variables and a process group. A site
usually trains alone (world size 1), possibly inside a Ray actor next to other actors on the
same host, so we create the group on a ``HashStore``: an in-memory store that needs no TCP port,
so parallel processes never fight over one. A site with several devices trains with one
process per device (``sites/multi_device.py`` starts them); those join one group through a
``FileStore`` in the launch's private folder (:func:`init_rank_process`): again no port.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_RANK_DEFAULTS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
#: World size of the data-parallel group :func:`init_rank_process` created in this process (0: none).
_RANK_WORLD = 0


def pick_device(choice: str) -> torch.device:
    """The training device for a config's ``device`` value.

    Args:
        choice: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {choice!r}: expected auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def autocast_dtype(bf16: bool | str, device: torch.device) -> torch.dtype | None:
    """The forward's autocast dtype for ``deepspeed.bf16`` on ``device``; None = fp32.

    Our choice for ``"auto"``: bf16 on a CUDA device that computes it natively (Ampere or newer,
    ``torch.cuda.is_bf16_supported``), fp32 elsewhere: CPU bf16 autocast is faster than fp32 only
    on CPUs with bf16 matrix units, and pre-Ampere GPUs emulate it.

    Args:
        bf16: ``True``, ``False`` or ``"auto"``.
        device: the training device (:func:`pick_device`).

    Raises:
        ValueError: ``True`` on a CUDA device without bf16.
    """
    if bf16 == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if bf16 is not True:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"deepspeed.bf16: true, but {torch.cuda.get_device_name(device)} has no native bf16; "
                         "set it to auto (fp32 there) or false")
    return torch.bfloat16


def _set_accelerator(device: torch.device) -> None:
    # DeepSpeed picks its accelerator once, on first use, by probing for CUDA; a CPU-only actor on
    # a GPU host would otherwise get the CUDA accelerator. An explicit, conflicting value is an
    # error rather than something we silently override.
    want = "cpu" if device.type == "cpu" else "cuda"
    have = os.environ.get("DS_ACCELERATOR")
    if have is None:
        os.environ["DS_ACCELERATOR"] = want
    elif have != want:
        raise ValueError(f"DS_ACCELERATOR={have!r} is set but training runs on {device}; unset it or change cfg.device")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_single_process(device: torch.device) -> None:
    """Set the rank variables and create a world-size-1 process group, once per process.

    Args:
        device: the training device; selects the backend (gloo on CPU, nccl on CUDA) and
            DeepSpeed's accelerator.
    """
    for key, value in _RANK_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _set_accelerator(device)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"a process group of world size {dist.get_world_size()} exists that fedpanfm did not "
                               "create; a site's data-parallel ranks are started by sites/multi_device.py")
        return
    dist.init_process_group(backend=_backend(device), store=dist.HashStore(), rank=0, world_size=1)


def rank_device(choice: str, rank: int) -> torch.device:
    """The device of data-parallel rank ``rank``: ``cuda:<rank>`` on CUDA, else the CPU.

    Args:
        choice: the config's ``device`` (:func:`pick_device`).
        rank: the rank (one process per device, so also its local index).

    Raises:
        ValueError: the rank has no CUDA device of its own.
    """
    device = pick_device(choice)
    if device.type != "cuda":
        return device
    if rank >= torch.cuda.device_count():
        raise ValueError(f"rank {rank} needs CUDA device {rank}, but this process sees {torch.cuda.device_count()} "
                         "(CUDA_VISIBLE_DEVICES); lower the site's device count")
    return torch.device("cuda", rank)


def init_rank_process(device: torch.device, rank: int, world_size: int, store_path: str,
                      timeout_s: float = 600.0) -> None:
    """Join a site's data-parallel group: rank ``rank`` of ``world_size`` processes, one per device.

    Args:
        device: this rank's device (:func:`rank_device`); gloo on CPU, NCCL on CUDA.
        rank: this process's rank.
        world_size: processes in the group (the site's devices).
        store_path: a file in a folder private to this launch; the ranks meet there
            (``torch.distributed.FileStore``), so no port is opened.
        timeout_s: how long a collective (the rendezvous included) waits for the other ranks.
            The launcher notices a dead rank long before: it stops the survivors itself.
    """
    global _RANK_WORLD
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if dist.is_initialized():
        raise RuntimeError("init_rank_process: this process already has a process group")
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    _set_accelerator(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend=_backend(device), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    _RANK_WORLD = world_size


def data_parallel_world() -> int:
    """World size of this process's site data-parallel group; 1 when it trains alone."""
    return _RANK_WORLD if _RANK_WORLD > 1 and dist.is_initialized() else 1


__all__ = ["autocast_dtype", "data_parallel_world", "init_rank_process", "init_single_process", "pick_device",
           "rank_device"]
