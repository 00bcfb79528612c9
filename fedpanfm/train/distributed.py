"""Run DeepSpeed outside its launcher: a world-size-1 process group and the device choice.

DeepSpeed expects its launcher to have set the rank variables and a process group. A site
trains alone (world size 1), possibly inside a Ray actor next to other actors on the same
host, so we create the group on a ``HashStore``: an in-memory store that needs no TCP port,
so parallel processes never fight over one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_RANK_DEFAULTS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


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
            raise RuntimeError(f"a process group of world size {dist.get_world_size()} exists; fedpanfm trains one process per site")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


__all__ = ["autocast_dtype", "init_single_process", "pick_device"]
