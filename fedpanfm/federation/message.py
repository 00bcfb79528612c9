"""The federation's wire format: what the server sends a site and what a site replies.

Both sides import this module, so the record names and checks live in one place.

Server -> site (``TrainInstruction``), a Flower ``RecordDict`` with
    ``"arrays"``    ArrayRecord: the global ``PanFMSSL`` state dict, fp32 or, with
                    ``federation.transfer_dtype: bf16``, raw bf16 bytes (``BF16_STYPE``);
    ``"fedpanfm"``  ConfigRecord: ``protocol-version``, ``server-round``, ``num-rounds``,
                    ``start-step`` / ``total-steps`` (schedule position), ``global-saliency``
                    (list in organ order), ``organ-names``, ``teacher-policy``.
Site -> server (``SiteUpdate``):
    ``"arrays"``    ArrayRecord: the site's updated weights, fp32 numpy arrays or, with
                    ``federation.transfer_dtype: bf16``, raw bf16 bytes: for a floating tensor
                    the site received this round the bf16 DELTA ``new - received``
                    (``BF16_DELTA_STYPE``, decoded against the server's fp32 master), for any
                    other floating tensor the bf16 weights (``BF16_STYPE``); the
                    keys the server reads (``fedpanfm.federation.transfer``: no teacher unless
                    the teacher policy is "aggregate"; with ``federation.sparse_experts`` no
                    expert the site routed no gate mass to);
    ``"metrics"``   MetricRecord: ``num-examples`` (training subjects, Flower's weighting key),
                    ``organ-subjects`` (list in organ order), ``gate-mass`` (flattened (L, E))
                    + ``gate-mass-shape``, ``saliency`` (list in organ order), ``steps``, and the
                    training metrics (every other key; finite scalars);
    ``"site"``      ConfigRecord: ``protocol-version``, ``site-name``, ``organ-names``.

Decoding checks the version and every field and raises :class:`MessageError` with the reason.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedpanfm.certs import check_site_name

PROTOCOL_VERSION = 1
ARRAYS = "arrays"
SERVER_CONFIG = "fedpanfm"
METRICS = "metrics"
SITE_CONFIG = "site"
NUM_EXAMPLES = "num-examples"
TEACHER_POLICIES = ("server_ema", "aggregate", "local")
# MetricRecord keys with a fixed meaning; every other key of "metrics" is a training metric.
RESERVED_METRICS = (NUM_EXAMPLES, "organ-subjects", "gate-mass", "gate-mass-shape", "saliency", "steps")


class MessageError(ValueError):
    """A message does not follow the protocol.

    Args:
        reason: what is wrong, naming the record and key at fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- tensors


#: ``Array.stype`` of a tensor sent as raw little-endian bf16 bytes (numpy has no bf16).
BF16_STYPE = "fedpanfm.bf16"
#: ``Array.stype`` of a tensor sent as the raw bf16 bytes of ``new - reference``: the receiver
#: adds it to its own fp32 copy of the reference (ours: docs/performance.md, "bf16 both ways").
BF16_DELTA_STYPE = "fedpanfm.bf16-delta"
TRANSFER_DTYPES = ("fp32", "bf16")


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
        import io

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
        import io

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


# --------------------------------------------------------------------------- field checks


def _get(record: Mapping[str, object], key: str, where: str) -> object:
    if key not in record:
        raise MessageError(f"{where}: missing {key!r}")
    return record[key]


def _int(record: Mapping[str, object], key: str, where: str, lo: int = 0) -> int:
    v = _get(record, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise MessageError(f"{where}: {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _floats(record: Mapping[str, object], key: str, where: str, n: int | None, nonneg: bool = True) -> list[float]:
    v = _get(record, key, where)
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise MessageError(f"{where}: {key!r} must be a list of numbers, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise MessageError(f"{where}: {key!r} has {len(v)} entries, expected {n} (one per organ)")
    out = [float(x) for x in v]
    bad = [i for i, x in enumerate(out) if not math.isfinite(x) or (nonneg and x < 0)]
    if bad:
        raise MessageError(f"{where}: {key!r}[{bad[0]}] = {out[bad[0]]} (must be finite{' and >= 0' if nonneg else ''})")
    return out


def _str_list(record: Mapping[str, object], key: str, where: str) -> list[str]:
    v = _get(record, key, where)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MessageError(f"{where}: {key!r} must be a list of strings")
    return list(v)


#: At most this many metrics in a reply, each name at most 128 characters of ``[A-Za-z0-9_./-]``
#: (they become TensorBoard tags and JSON keys on the server).
MAX_METRICS = 512
_METRIC_NAME = re.compile(r"[A-Za-z0-9_./\-]{1,128}")


def _site_name(record: Mapping[str, object], where: str) -> str:
    """The record's ``site-name``, checked as a site name (it names files and logs on the server)."""
    name = _get(record, "site-name", where)
    try:
        return check_site_name(name, f"{where}: 'site-name'")  # type: ignore[arg-type]
    except ValueError as exc:
        raise MessageError(str(exc)) from None


def _scalar_metrics(m: Mapping[str, object], skip: Sequence[str], where: str, what: str) -> dict[str, float]:
    """Every key of ``m`` but ``skip`` as a finite float, names and count checked."""
    if len(m) > MAX_METRICS + len(skip):
        raise MessageError(f"{where}: {len(m)} metrics, more than the {MAX_METRICS} a reply may carry")
    out: dict[str, float] = {}
    for key, v in m.items():
        if key in skip:
            continue
        if not _METRIC_NAME.fullmatch(key):
            raise MessageError(f"{where}: {what} name {key[:40]!r} is not 1-128 characters of letters, digits, _ . / -")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MessageError(f"{where}: {what} {key!r} = {v!r} is not a finite number")
        out[key] = float(v)
    return out


def _version(record: Mapping[str, object], where: str) -> None:
    v = _get(record, "protocol-version", where)
    if v != PROTOCOL_VERSION:
        raise MessageError(f"{where}: protocol version {v!r}, this build speaks {PROTOCOL_VERSION}")


def _record(rd: RecordDict, key: str, kind: type, where: str) -> object:
    if key not in rd:
        raise MessageError(f"{where}: no {kind.__name__} {key!r} (has {', '.join(rd.keys()) or 'nothing'})")
    rec = rd[key]
    if not isinstance(rec, kind):
        raise MessageError(f"{where}: {key!r} is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def _check_organs(names: Sequence[str], expected: Sequence[str] | None, where: str) -> None:
    if expected is not None and tuple(names) != tuple(expected):
        raise MessageError(f"{where}: organ vocabulary {list(names)} differs from ours {list(expected)}")


# --------------------------------------------------------------------------- server -> site


@dataclass
class TrainInstruction:
    """What the server sends each site for one round of local training.

    Args:
        arrays: the global state dict, already encoded (``state_to_arrayrecord``, fp32 or plain
            bf16 by ``federation.transfer_dtype``); kept encoded so the server serialises the
            global model once per round, not once per site.
        server_round: the round about to run, from 1.
        num_rounds: rounds planned in total.
        start_step: the global optimiser step at which this round starts; a site positions its
            LR / momentum / temperature schedules here.
        total_steps: the optimiser steps planned over the whole run (the schedules' length).
        global_saliency: federation-wide organ saliency shares, in ``organ_names`` order.
        organ_names: the organ vocabulary order of ``global_saliency``.
        teacher_policy: "server_ema", "aggregate" or "local" (docs/federation.md).
    """

    arrays: ArrayRecord
    server_round: int
    num_rounds: int
    start_step: int
    total_steps: int
    global_saliency: list[float]
    organ_names: list[str]
    teacher_policy: str

    def state(self) -> dict[str, Tensor]:
        """The global weights as fp32 tensors (checked: finite; bf16 arrays widened)."""
        return arrayrecord_to_state(self.arrays, "server instruction")

    def to_recorddict(self) -> RecordDict:
        return RecordDict(
            {
                ARRAYS: self.arrays,
                SERVER_CONFIG: ConfigRecord(
                    {
                        "protocol-version": PROTOCOL_VERSION,
                        "server-round": int(self.server_round),
                        "num-rounds": int(self.num_rounds),
                        "start-step": int(self.start_step),
                        "total-steps": int(self.total_steps),
                        "global-saliency": [float(x) for x in self.global_saliency],
                        "organ-names": list(self.organ_names),
                        "teacher-policy": self.teacher_policy,
                    }
                ),
            }
        )

    @classmethod
    def from_recorddict(cls, rd: RecordDict, organ_names: Sequence[str] | None = None) -> "TrainInstruction":
        """Decode and check a server instruction.

        Args:
            rd: the message content.
            organ_names: the receiver's organ vocabulary; a different one is an error.
        """
        where = "server instruction"
        cfg = _record(rd, SERVER_CONFIG, ConfigRecord, where)
        arrays = _record(rd, ARRAYS, ArrayRecord, where)
        assert isinstance(cfg, ConfigRecord) and isinstance(arrays, ArrayRecord)
        _version(cfg, where)
        names = _str_list(cfg, "organ-names", where)
        _check_organs(names, organ_names, where)
        policy = _get(cfg, "teacher-policy", where)
        if policy not in TEACHER_POLICIES:
            raise MessageError(f"{where}: teacher-policy {policy!r} is not one of {TEACHER_POLICIES}")
        server_round = _int(cfg, "server-round", where, lo=1)
        num_rounds = _int(cfg, "num-rounds", where, lo=1)
        if server_round > num_rounds:
            raise MessageError(f"{where}: server-round {server_round} exceeds num-rounds {num_rounds}")
        return cls(
            arrays=arrays,
            server_round=server_round,
            num_rounds=num_rounds,
            start_step=_int(cfg, "start-step", where),
            total_steps=_int(cfg, "total-steps", where, lo=1),
            global_saliency=_floats(cfg, "global-saliency", where, len(names)),
            organ_names=names,
            teacher_policy=str(policy),
        )


# --------------------------------------------------------------------------- site -> server


@dataclass
class SiteUpdate:
    """What a site replies after local training.

    Args:
        site: the site's name (its folder / node-config ``site-name``).
        state: the site's updated state dict (decoded: fp32 whatever travelled).
        num_examples: training subjects used this round (Flower's ``num-examples``).
        organ_subjects: (n_organs,) training subjects holding each organ, in organ order.
        gate_mass: (L, E) gate mass the site's student routed to expert e of block l this
            round; (L, 0) or (0, 0) without DEX.
        saliency: (n_organs,) the site's own organ saliency estimate, in organ order.
        organ_names: the organ vocabulary order of ``organ_subjects`` and ``saliency``.
        metrics: training metrics (losses, mask rates ...), finite floats.
        steps: optimiser steps taken this round.
        transfer_dtype: how ``state``'s floating tensors travel: "fp32" or "bf16" (encoding
            only; a decoded update holds fp32 whatever the sender chose).
        reference: encoding only, with "bf16": the fp32 state the site decoded from the
            server's instruction this round (before its kept local tensors were laid over it);
            floating tensors of the same key and shape travel as bf16 deltas against it
            (:func:`state_to_arrayrecord`). None: plain bf16.
    """

    site: str
    state: dict[str, Tensor]
    num_examples: int
    organ_subjects: Tensor
    gate_mass: Tensor
    saliency: Tensor
    organ_names: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    transfer_dtype: str = "fp32"
    reference: Mapping[str, Tensor] | None = field(default=None, repr=False)

    def to_recorddict(self) -> RecordDict:
        clash = sorted(set(self.metrics) & set(RESERVED_METRICS))
        if clash:
            raise MessageError(f"site {self.site}: training metric {clash[0]!r} uses a reserved name")
        gm = self.gate_mass.detach().to(torch.float64).cpu()
        if gm.dim() != 2:
            raise MessageError(f"site {self.site}: gate mass must be (L, E), got shape {tuple(gm.shape)}")
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: int(self.num_examples),
                "organ-subjects": [float(x) for x in self.organ_subjects.flatten().tolist()],
                "gate-mass": gm.flatten().tolist(),
                "gate-mass-shape": [int(s) for s in gm.shape],
                "saliency": [float(x) for x in self.saliency.flatten().tolist()],
                "steps": int(self.steps),
                **{k: float(v) for k, v in self.metrics.items()},
            }
        )
        site = ConfigRecord(
            {"protocol-version": PROTOCOL_VERSION, "site-name": self.site, "organ-names": list(self.organ_names)}
        )
        arrays = state_to_arrayrecord(self.state, self.transfer_dtype, self.reference)
        return RecordDict({ARRAYS: arrays, METRICS: metrics, SITE_CONFIG: site})

    @classmethod
    def from_recorddict(cls, rd: RecordDict, organ_names: Sequence[str] | None = None, sender: str = "site",
                        reference: Mapping[str, Tensor] | None = None) -> "SiteUpdate":
        """Decode and check a site's reply.

        Args:
            rd: the reply content.
            organ_names: the server's organ vocabulary; a site with another one is rejected.
            sender: how to name the sender in errors until its site name is known (e.g. "node 7").
            reference: the server's fp32 master global state of the round, against which bf16
                delta arrays are decoded; None: a delta array is rejected.
        """
        site_cfg = _record(rd, SITE_CONFIG, ConfigRecord, sender)
        assert isinstance(site_cfg, ConfigRecord)
        _version(site_cfg, sender)
        name = _site_name(site_cfg, sender)
        where = f"{sender} (site {name})"
        names = _str_list(site_cfg, "organ-names", where)
        _check_organs(names, organ_names, where)
        m = _record(rd, METRICS, MetricRecord, where)
        arrays = _record(rd, ARRAYS, ArrayRecord, where)
        assert isinstance(m, MetricRecord) and isinstance(arrays, ArrayRecord)

        n = _int(m, NUM_EXAMPLES, where, lo=1)
        organ_subjects = _floats(m, "organ-subjects", where, len(names))
        over = [i for i, c in enumerate(organ_subjects) if c > n]
        if over:
            raise MessageError(f"{where}: organ-subjects[{over[0]}] = {organ_subjects[over[0]]} exceeds num-examples {n}")
        shape = _get(m, "gate-mass-shape", where)
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise MessageError(f"{where}: 'gate-mass-shape' must be [L, E] non-negative integers, got {shape!r}")
        gate = _floats(m, "gate-mass", where, shape[0] * shape[1])
        saliency = _floats(m, "saliency", where, len(names))
        metrics = _scalar_metrics(m, RESERVED_METRICS, where, "training metric")
        return cls(
            site=name,
            state=arrayrecord_to_state(arrays, where, reference, expected=reference),
            num_examples=n,
            organ_subjects=torch.tensor(organ_subjects, dtype=torch.float64),
            gate_mass=torch.tensor(gate, dtype=torch.float64).reshape(shape),
            saliency=torch.tensor(saliency, dtype=torch.float64),
            organ_names=names,
            metrics=metrics,
            steps=_int(m, "steps", where),
        )


@dataclass
class SiteEvaluation:
    """What a site replies to an evaluate message (sites/client_app.py ``evaluate_site``).

    Args:
        site: the site's name as the reply states it (the server compares it with the node's
            authenticated site).
        num_examples: held-out subjects evaluated.
        metrics: ``val/<metric>`` -> finite float.
    """

    site: str
    num_examples: int
    metrics: dict[str, float]

    @classmethod
    def from_recorddict(cls, rd: RecordDict, sender: str = "site") -> "SiteEvaluation":
        """Decode and check an evaluate reply (its bounds against the config:
        ``fedpanfm.federation.validation.check_evaluation``).

        Args:
            rd: the reply content.
            sender: how to name the sender in errors (e.g. "node 7").
        """
        site_cfg = _record(rd, SITE_CONFIG, ConfigRecord, sender)
        assert isinstance(site_cfg, ConfigRecord)
        _version(site_cfg, sender)
        name = _site_name(site_cfg, sender)
        where = f"{sender} (site {name})"
        m = _record(rd, METRICS, MetricRecord, where)
        assert isinstance(m, MetricRecord)
        n = _int(m, NUM_EXAMPLES, where, lo=1)
        metrics = _scalar_metrics(m, (NUM_EXAMPLES,), where, "validation metric")
        stray = [k for k in metrics if not k.startswith("val/")]
        if stray:
            raise MessageError(f"{where}: validation metric {stray[0]!r} is not under 'val/'")
        return cls(site=name, num_examples=n, metrics=metrics)


__all__ = [
    "ARRAYS",
    "BF16_DELTA_STYPE",
    "BF16_STYPE",
    "TRANSFER_DTYPES",
    "METRICS",
    "MessageError",
    "NUM_EXAMPLES",
    "PROTOCOL_VERSION",
    "SERVER_CONFIG",
    "SITE_CONFIG",
    "MAX_METRICS",
    "SiteEvaluation",
    "SiteUpdate",
    "TEACHER_POLICIES",
    "TrainInstruction",
    "arrayrecord_to_state",
    "state_nbytes",
    "state_to_arrayrecord",
]
