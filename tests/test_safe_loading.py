"""Nothing is ever unpickled: checkpoints are safetensors, arrays are loaded with allow_pickle=False."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedpanfm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Boom:
    def __reduce__(self):
        return (Path("/tmp/fedpanfm-pwned").touch, ())


def test_a_pickled_checkpoint_is_refused_even_with_valid_checksums(tmp_path: Path) -> None:
    ck = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, tiny_config(), {"round": 1})
    # An attacker who can write the folder swaps in a pickle (as torch.save writes) and fixes the sums.
    (ck / "model.safetensors").write_bytes(pickle.dumps({"w": Boom()}))
    lines = [f"{hashlib.sha256((ck / n).read_bytes()).hexdigest()}  {n}" for n in ("model.safetensors", "config.yaml", "meta.json")]
    (ck / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="cannot read tensors"):
        load_checkpoint(ck)
    assert not Path("/tmp/fedpanfm-pwned").exists()


def test_an_object_npy_is_refused(tmp_path: Path) -> None:
    from fedpanfm.data.readers import read_image  # noqa: F401  (the reader loads .npy with allow_pickle=False)

    path = tmp_path / "x.npy"
    np.save(path, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(path, allow_pickle=False)


def test_no_unsafe_loader_in_the_code() -> None:
    unsafe = []
    for path in [*ROOT.glob("fedpanfm/**/*.py"), *ROOT.glob("sites/**/*.py"), *ROOT.glob("orchestration/**/*.py"),
                 *ROOT.glob("bench/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|joblib\.load", code):
                unsafe.append(f"{path}:{n}")
            if "torch.load(" in code and "weights_only=True" not in code:
                unsafe.append(f"{path}:{n}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                unsafe.append(f"{path}:{n}")
    assert not unsafe, unsafe
