"""The federation's protocol: what the server sends a site and what a site replies.

Both sides import this module, so the record names and checks live in one place; the arrays
inside the records are encoded by ``fedpanfm/federation/tensor_codec.py``.

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
Site -> server after evaluation (``SiteEvaluation``):
    ``"metrics"``   MetricRecord: ``num-examples`` (held-out subjects), ``val/<metric>`` each;
    ``"site"``      ConfigRecord: ``protocol-version``, ``site-name``.

Decoding checks the version and every field and raises :class:`MessageError` with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedpanfm.config import TransferDtype
from fedpanfm.federation.teacher_policy import TEACHER_POLICIES
from fedpanfm.federation.tensor_codec import MessageError, arrayrecord_to_state, state_to_arrayrecord
from fedpanfm.site_names import check_site_name

PROTOCOL_VERSION = 1
ARRAYS = "arrays"
SERVER_CONFIG = "fedpanfm"
METRICS = "metrics"
SITE_CONFIG = "site"
NUM_EXAMPLES = "num-examples"
# MetricRecord keys with a fixed meaning; every other key of "metrics" is a training metric.
RESERVED_METRICS = (NUM_EXAMPLES, "organ-subjects", "gate-mass", "gate-mass-shape", "saliency", "steps")


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

    def to_recorddict(self, transfer_dtype: TransferDtype = "fp32",
                      reference: Mapping[str, Tensor] | None = None) -> RecordDict:
        """The reply's records.

        Args:
            transfer_dtype: how ``state``'s floating tensors travel: "fp32" or "bf16" (a decoded
                update holds fp32 whatever the sender chose).
            reference: with "bf16": the fp32 state the site decoded from the server's
                instruction this round (before its kept local tensors were laid over it);
                floating tensors of the same key and shape travel as bf16 deltas against it
                (:func:`~fedpanfm.federation.tensor_codec.state_to_arrayrecord`). None: plain bf16.
        """
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
        arrays = state_to_arrayrecord(self.state, transfer_dtype, reference)
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
    """What a site replies to an evaluate message (sites/handlers.py ``evaluate_site``).

    Args:
        site: the site's name as the reply states it (the server compares it with the node's
            authenticated site).
        num_examples: held-out subjects evaluated.
        metrics: ``val/<metric>`` -> finite float.
    """

    site: str
    num_examples: int
    metrics: dict[str, float]

    def to_recorddict(self) -> RecordDict:
        stray = [k for k in self.metrics if not k.startswith("val/")]
        if stray:
            raise MessageError(f"site {self.site}: validation metric {stray[0]!r} is not under 'val/'")
        metrics = MetricRecord({NUM_EXAMPLES: int(self.num_examples), **{k: float(v) for k, v in self.metrics.items()}})
        site = ConfigRecord({"protocol-version": PROTOCOL_VERSION, "site-name": self.site})
        return RecordDict({METRICS: metrics, SITE_CONFIG: site})

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
    "MAX_METRICS",
    "METRICS",
    "NUM_EXAMPLES",
    "PROTOCOL_VERSION",
    "RESERVED_METRICS",
    "SERVER_CONFIG",
    "SITE_CONFIG",
    "SiteEvaluation",
    "SiteUpdate",
    "TrainInstruction",
]
