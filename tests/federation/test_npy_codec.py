"""The cached .npy header path of the wire format: the same bytes as Flower's own encoding, the
same arrays back, and malformed payloads rejected naming the array."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpanfm.federation.tensor_codec import MessageError, arrayrecord_to_state, state_to_arrayrecord


@pytest.mark.parametrize("a", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.int64),
    np.array(2.5, dtype=np.float32),
    np.zeros((0, 3), dtype=np.float32),
    np.ones((2, 3, 4), dtype=np.bool_),
])
def test_encoding_is_byte_identical_to_flower_and_decodes(a: np.ndarray) -> None:
    record = state_to_arrayrecord({"k": torch.from_numpy(a.copy())})
    ours = record["k"]
    flower = Array(a)
    assert ours.data == flower.data and ours.stype == flower.stype
    assert ours.dtype == flower.dtype and tuple(ours.shape) == tuple(flower.shape)
    np.testing.assert_array_equal(ours.numpy(), a)  # Flower's own reader
    back = arrayrecord_to_state(record)["k"]
    assert back.shape == a.shape and np.array_equal(back.numpy(), a)


def test_cached_header_reads_each_payload_not_the_first() -> None:
    first = arrayrecord_to_state(state_to_arrayrecord({"w": torch.ones(2, 3)}))["w"]
    second = arrayrecord_to_state(state_to_arrayrecord({"w": torch.full((2, 3), 7.0)}))["w"]
    assert torch.equal(first, torch.ones(2, 3)) and torch.equal(second, torch.full((2, 3), 7.0))


def test_version_2_header_and_fortran_order() -> None:
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, np.lib.format.header_data_from_array_1_0(a))
    data = buf.getvalue() + a.tobytes(order="F")
    record = ArrayRecord({"f": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)})
    np.testing.assert_array_equal(arrayrecord_to_state(record)["f"].numpy(), a)


def test_malformed_payloads_name_the_array() -> None:
    good = state_to_arrayrecord({"w": torch.ones(4)})["w"]
    bad_magic = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"XNUMPY" + good.data[6:])
    with pytest.raises(MessageError, match="site x: array 'w' cannot be decoded: .*magic"):
        arrayrecord_to_state(ArrayRecord({"w": bad_magic}), "site x")
    short = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=good.data[:-4])
    with pytest.raises(MessageError, match="array 'w' cannot be decoded"):
        arrayrecord_to_state(ArrayRecord({"w": short}), "site x")
