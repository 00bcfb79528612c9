"""The trainer worker's wire format: the auth key file and the frames both ends speak.

``multiprocessing.connection`` over a Unix-domain socket, authenticated with a random key from
a 0600 file. Only bytes cross it, never pickles (``send_bytes`` / ``recv_bytes``): frame 0 is a
JSON header, every further frame is one array's payload exactly as Flower's ``Array`` holds it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

WIRE_VERSION = 1
OPS = ("train", "evaluate")
#: sun_path holds 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
KEY_BYTES = 32


class WorkerUnavailable(ConnectionError):
    """No worker answered: not running, refused the key, or died before replying."""


class WorkerError(RuntimeError):
    """The worker ran the request and it failed; the message is the worker's error."""


class WorkerProtocolError(ValueError):
    """A frame does not follow the wire format; the message names the record / key at fault."""


def check_socket_path(path: Path, where: str) -> None:
    """Raise ValueError (naming ``where``) when ``path`` is too long for a Unix socket.

    Args:
        path: the socket path.
        where: what names it (a config file and key, or the worker's argument).
    """
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"{where}: the trainer socket path {path} is longer than {MAX_SOCKET_PATH} bytes "
                         "(a Unix socket limit): use a shorter state folder")


# --------------------------------------------------------------------------- auth key


def ensure_authkey(path: Path) -> None:
    """Create the worker's auth key file (32 random bytes, mode 0600) if it does not exist.

    Args:
        path: the key file, in the site's state folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        read_authkey(path)  # an existing key must still be private and whole
        return
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(KEY_BYTES))


def read_authkey(path: Path) -> bytes:
    """The auth key; a missing file is :class:`WorkerUnavailable`, a non-private one ValueError.

    Args:
        path: the key file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WorkerUnavailable(f"trainer key file {path} does not exist (is the worker set up?)") from None
    if st.st_mode & 0o077:
        raise ValueError(f"trainer key file {path} has mode {stat.S_IMODE(st.st_mode):#o}: readable by others; "
                         f"chmod 600 {path}")
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"trainer key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


# --------------------------------------------------------------------------- wire format


def encode_recorddict(rd: RecordDict, blobs: list[bytes], where: str) -> dict[str, Any]:
    """A RecordDict as a JSON-able spec; array payloads are appended to ``blobs``.

    Args:
        rd: the records (ArrayRecord, MetricRecord, ConfigRecord).
        blobs: receives each array's bytes; the spec names their index.
        where: names the records in errors (e.g. "train content").
    """
    spec: dict[str, Any] = {}
    for name, rec in rd.items():
        if isinstance(rec, ArrayRecord):
            items = []
            for key, arr in rec.items():
                items.append({"key": key, "dtype": arr.dtype, "shape": [int(s) for s in arr.shape],
                              "stype": arr.stype, "blob": len(blobs)})
                blobs.append(arr.data)
            spec[name] = {"kind": "arrays", "items": items}
            continue
        kind = "metrics" if isinstance(rec, MetricRecord) else "config" if isinstance(rec, ConfigRecord) else None
        if kind is None:
            raise WorkerProtocolError(f"{where}: record {name!r} is a {type(rec).__name__}")
        for key, v in rec.items():
            if isinstance(v, bytes) or (isinstance(v, list) and any(isinstance(x, bytes) for x in v)):
                raise WorkerProtocolError(f"{where}: record {name!r} key {key!r} holds bytes, which the "
                                          "worker protocol does not carry")
        spec[name] = {"kind": kind, "items": dict(rec)}
    return spec


def decode_recorddict(spec: Any, blobs: list[bytes], where: str) -> RecordDict:
    """Rebuild a RecordDict from :func:`encode_recorddict`'s spec and the received blobs.

    Args:
        spec: the spec from the JSON header.
        blobs: the array payload frames.
        where: names the records in errors.
    """
    if not isinstance(spec, dict):
        raise WorkerProtocolError(f"{where}: expected an object of records, got {type(spec).__name__}")
    rd = RecordDict()
    for name, rec in spec.items():
        if not isinstance(rec, dict) or rec.get("kind") not in ("arrays", "metrics", "config"):
            raise WorkerProtocolError(f"{where}: record {name!r} has no valid 'kind'")
        items = rec.get("items")
        if rec["kind"] == "metrics" and isinstance(items, dict):
            rd[name] = MetricRecord(items)
        elif rec["kind"] == "config" and isinstance(items, dict):
            rd[name] = ConfigRecord(items)
        elif rec["kind"] == "arrays" and isinstance(items, list):
            arrays = ArrayRecord()
            for it in items:
                ok = (isinstance(it, dict) and isinstance(it.get("key"), str) and isinstance(it.get("dtype"), str)
                      and isinstance(it.get("stype"), str) and isinstance(it.get("blob"), int)
                      and 0 <= it["blob"] < len(blobs) and isinstance(it.get("shape"), list)
                      and all(isinstance(s, int) and s >= 0 for s in it["shape"]))
                if not ok:
                    raise WorkerProtocolError(f"{where}: record {name!r}: malformed array entry {str(it)[:200]}")
                arrays[it["key"]] = Array(dtype=it["dtype"], shape=tuple(it["shape"]), stype=it["stype"],
                                          data=blobs[it["blob"]])
            rd[name] = arrays
        else:
            raise WorkerProtocolError(f"{where}: record {name!r}: 'items' has the wrong type for kind {rec['kind']!r}")
    return rd


def send_frames(conn: Connection, header: Mapping[str, Any], blobs: list[bytes]) -> None:
    """Send a JSON header (with the blob count) and then each blob as its own frame."""
    conn.send_bytes(json.dumps({**header, "wire": WIRE_VERSION, "blobs": len(blobs)}).encode())
    for b in blobs:
        conn.send_bytes(b)


def recv_frames(conn: Connection, where: str) -> tuple[dict[str, Any], list[bytes]]:
    """Receive what :func:`send_frames` sent: (header, blobs).

    Args:
        conn: the connection.
        where: names the peer in errors.
    """
    try:
        header = json.loads(conn.recv_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkerProtocolError(f"{where}: header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("wire") != WIRE_VERSION:
        raise WorkerProtocolError(f"{where}: wire version {header.get('wire') if isinstance(header, dict) else None!r}, "
                                  f"this build speaks {WIRE_VERSION}")
    n = header.get("blobs")
    if not isinstance(n, int) or n < 0:
        raise WorkerProtocolError(f"{where}: 'blobs' must be a count, got {n!r}")
    return header, [conn.recv_bytes() for _ in range(n)]
