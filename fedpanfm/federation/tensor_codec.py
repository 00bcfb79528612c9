"""State dicts <-> Flower ArrayRecords: the tensor codec both ends of the federation use.

Floating tensors travel as fp32 numpy arrays (Flower's own serialisation, readable by any
Flower code) or, with ``federation.transfer_dtype: bf16``, as raw little-endian bf16 bytes
(``BF16_STYPE``), or as bf16 deltas against a state the receiver also holds
(``BF16_DELTA_STYPE``; docs/performance.md, "bf16 both ways"). Decoding always yields fp32 and
checks dtype, size and finiteness; an array the receiver does not expect is refused before it is
decoded. The message records around the arrays are ``fedpanfm/federation/protocol.py``.
"""

from __future__ import annotations

import io
import math
import typing
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from fedpanfm.config import TransferDtype


class MessageError(ValueError):
    """A message (or an array in it) does not follow the protocol.

    Args:
        reason: what is wrong, naming the record and key at fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason



#: ``Array.stype`` of a tensor sent as raw little-endian bf16 bytes (numpy has no bf16).
BF16_STYPE = "fedpanfm.bf16"
#: ``Array.stype`` of a tensor sent as the raw bf16 bytes of ``new - reference``: the receiver
#: adds it to its own fp32 copy of the reference (ours: docs/performance.md, "bf16 both ways").
BF16_DELTA_STYPE = "fedpanfm.bf16-delta"
#: Every wire precision the config accepts (its Literal).
TRANSFER_DTYPES: tuple[str, ...] = typing.get_args(TransferDtype)


def _bf16_array(t: Tensor, stype: str) -> Array:
    """``t`` as raw bf16 bytes: round-to-nearest-even cast, the 2-byte patterns as in memory."""
    raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return Array(dtype="bfloat16", shape=tuple(int(s) for s in t.shape), stype=stype, data=raw.tobytes())


def state_to_arrayrecord(state: Mapping[str, Tensor], transfer_dtype: str = "fp32",
                         reference: Mapping[str, Tensor] | None = None) -> ArrayRecord:
    """A state dict as an ArrayRecord.

    Args:
        state: key -> tensor (any device / float dtype).
        transfer_dtype: "fp32": floating tensors travel as fp32 numpy arrays (bf16 and fp16 are
            widened), readable by any Flower code; "bf16": floating tensors travel as raw bf16
            bytes (half the bytes of fp32), decoded back to fp32 by :func:`arrayrecord_to_state`.
            Integer / bool tensors always travel unchanged.
        reference: with "bf16" only: the fp32 state the receiver also holds (a site: what it
            decoded from the server's instruction). A floating tensor whose key is in it with
            the same shape travels as ``bf16(state - reference)`` (``BF16_DELTA_STYPE``): bf16
            then errs by 2^-8 of the round's change instead of 2^-8 of the weight. Other
            floating tensors travel as plain bf16 (``BF16_STYPE``). Not used with "fp32", which
            sends the exact weights (an fp32 delta could only add rounding).
    """
    if transfer_dtype not in TRANSFER_DTYPES:
        raise MessageError(f"state_to_arrayrecord: transfer dtype {transfer_dtype!r} is not one of {TRANSFER_DTYPES}")
    record = ArrayRecord()
    for key, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and transfer_dtype == "bf16":
            ref = reference.get(key) if reference is not None else None
            if ref is not None and ref.is_floating_point() and tuple(ref.shape) == tuple(t.shape):
                # The difference in fp32 (exact up to fp32 rounding), rounded to bf16 once.
                record[key] = _bf16_array(t.float() - ref.detach().to("cpu", torch.float32), BF16_DELTA_STYPE)
            else:
                record[key] = _bf16_array(t, BF16_STYPE)
            continue
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.to(torch.float32)
        # .numpy() of a contiguous CPU tensor is a view: the only copy is the bytes of the record.
        record[key] = _npy_array(t.contiguous().numpy())
    return record


#: .npy headers by (dtype, shape), and parsed headers by their bytes: a round encodes and
#: decodes the same few hundred shapes every time, and numpy's own header writing / parsing
#: (``np.save``; ``ast.literal_eval`` in ``np.load``) was most of the cost of a small model's
#: (de)serialisation (docs/performance.md, item 4). Bounded: cleared when it reaches this size.
_HEADER_CACHE_MAX = 4096
_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
_parsed: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _npy_array(a: np.ndarray) -> Array:
    """``Array(a)`` (Flower's numpy serialisation: ``np.save`` bytes, stype ``numpy.ndarray``)
    with the .npy header cached; the same bytes as ``np.save`` for a C-contiguous array."""
    if a.dtype.hasobject or not a.flags.c_contiguous:
        return Array(a)
    key = (a.dtype.str, tuple(a.shape))
    header = _headers.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(a))
        if len(_headers) >= _HEADER_CACHE_MAX:
            _headers.clear()
        header = _headers[key] = buf.getvalue()
    return Array(dtype=str(a.dtype), shape=tuple(int(s) for s in a.shape), stype="numpy.ndarray",
                 data=header + a.tobytes())


def _npy_view(arr: Array) -> np.ndarray:
    """The array of a numpy-serialised ``Array`` as a read-only view of its bytes.

    ``Array.numpy()`` goes through ``np.load``, which copies the payload; parsing the .npy header
    ourselves and wrapping the rest with ``np.frombuffer`` costs no copy (the aggregation reads
    every byte of every update, so a copy per array is a whole extra pass over them).
    """
    data = arr.data
    # magic (6) + version (2) + header length (2 bytes in format 1.0, 4 in 2.0 / 3.0)
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy payload (bad magic)")
    small = data[6] == 1
    end = (10 + int.from_bytes(data[8:10], "little")) if small else (12 + int.from_bytes(data[8:12], "little"))
    prefix = bytes(data[:end])
    parsed = _parsed.get(prefix)
    if parsed is None:
        buf = io.BytesIO(prefix)
        fmt = np.lib.format
        version = fmt.read_magic(buf)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        if buf.tell() != end:
            raise ValueError(f"header ends at byte {buf.tell()}, its length field says {end}")
        if len(_parsed) >= _HEADER_CACHE_MAX:
            _parsed.clear()
        parsed = _parsed[prefix] = (shape, fortran, dtype)
    shape, fortran, dtype = parsed
    count = math.prod(shape)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran else "C")


def arrayrecord_to_state(record: ArrayRecord, where: str = "arrays",
                         reference: Mapping[str, Tensor] | None = None,
                         expected: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """An ArrayRecord back as torch tensors, checking dtype and finiteness.

    Floating arrays arrive as fp32 (numpy), bf16 (``BF16_STYPE``) or bf16 deltas
    (``BF16_DELTA_STYPE``: decoded as ``reference[key] + delta`` in fp32); all come back as fp32
    tensors. fp32 tensors are read-only views of the message bytes (no copy): the receiver
    must not write into them (the trainer copies them into its parameters, the aggregation
    only reads them). The finiteness check applies to the decoded (reconstructed) tensor.

    Args:
        record: the record to decode.
        where: names the sender in error messages (e.g. "site hospital_a").
        reference: the state deltas are relative to (the server: its fp32 master global state
            of the round); None: a delta array is an error.
        expected: the keys and shapes the receiver accepts (the server: its global state); an
            array with another key or shape is refused BEFORE it is decoded, so an oversized
            or unknown array costs no memory beyond the message itself. None: no such check.

    Raises:
        MessageError: an undecodable array, a float dtype other than fp32 / bf16, NaN or Inf,
            or a delta without a reference tensor of its key and shape.
    """
    state: dict[str, Tensor] = {}
    if expected is not None:
        for key, arr in record.items():
            ref = expected.get(key)
            if ref is None:
                raise MessageError(f"{where}: unknown array {key!r} ({len(record)} arrays; the model has {len(expected)})")
            if tuple(int(x) for x in arr.shape) != tuple(ref.shape):
                raise MessageError(f"{where}: array {key!r} has shape {tuple(arr.shape)}, the model's is {tuple(ref.shape)}")
    for key, arr in record.items():
        try:
            if arr.stype in (BF16_STYPE, BF16_DELTA_STYPE):
                n = int(np.prod(arr.shape)) if arr.shape else 1
                if len(arr.data) != 2 * n:
                    raise ValueError(f"{len(arr.data)} bytes for {n} bf16 values of shape {tuple(arr.shape)}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only buffer; widened below
                    t = torch.frombuffer(arr.data, dtype=torch.bfloat16, count=n).reshape(tuple(arr.shape)).float()
            else:
                a = _npy_view(arr) if arr.stype == "numpy.ndarray" else arr.numpy()
                if a.dtype.kind == "f" and a.dtype != np.float32:
                    raise MessageError(f"{where}: array {key!r} is {a.dtype}; the protocol carries float32 or bf16")
                with warnings.catch_warnings():
                    # A view of immutable message bytes; we never write into received tensors.
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(a)
        except MessageError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MessageError(f"{where}: array {key!r} cannot be decoded: {exc}") from None
        if arr.stype == BF16_DELTA_STYPE:
            t = _add_delta(t, key, reference, where)
        # A NaN or Inf anywhere makes the float64 sum non-finite; a sum over finite fp32 values
        # cannot overflow float64, so this is exact and cheaper than an elementwise mask.
        if t.is_floating_point() and t.numel() and not math.isfinite(float(t.sum(dtype=torch.float64))):
            raise MessageError(f"{where}: array {key!r} holds NaN or Inf")
        state[key] = t
    return state


def _add_delta(delta: Tensor, key: str, reference: Mapping[str, Tensor] | None, where: str) -> Tensor:
    """``reference[key] + delta`` in fp32; the delta's key must be in ``reference`` with its shape."""
    if reference is None:
        raise MessageError(f"{where}: array {key!r} is a bf16 delta, but the receiver has no reference state to add it to")
    ref = reference.get(key)
    if ref is None:
        raise MessageError(f"{where}: array {key!r} is a bf16 delta of a tensor the receiver does not hold")
    if not ref.is_floating_point() or tuple(ref.shape) != tuple(delta.shape):
        raise MessageError(f"{where}: array {key!r} is a bf16 delta of shape {tuple(delta.shape)}; the reference "
                           f"tensor is {ref.dtype} {tuple(ref.shape)}")
    return ref.detach().to("cpu", torch.float32) + delta


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Payload bytes of a state dict (element bytes, without serialisation headers)."""
    return sum(t.numel() * t.element_size() for t in state.values())


__all__ = [
    "BF16_DELTA_STYPE",
    "BF16_STYPE",
    "MessageError",
    "TRANSFER_DTYPES",
    "arrayrecord_to_state",
    "state_nbytes",
    "state_to_arrayrecord",
]
