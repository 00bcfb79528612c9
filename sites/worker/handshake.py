"""The trainer worker's handshake: mutual HMAC-SHA256 challenge-response, constant-time, with timeouts.

Why not ``multiprocessing.connection``'s ``authkey``: CPython 3.11 compares the digest with
``==`` (``deliver_challenge``: timing leaks how much of a forged digest is right), uses HMAC-MD5,
and sets no timeout, so a client that connects and says nothing holds the single-threaded
worker, and every site request behind it, forever. We keep its framing (``send_bytes`` /
``recv_bytes``) and do the handshake ourselves:

1. worker -> client: ``CHALLENGE`` + 32 random bytes ``n_w``;
2. client -> worker: ``HMAC(key, "client" + n_w)`` + 32 random bytes ``n_c``;
3. worker -> client: ``WELCOME`` + ``HMAC(key, "worker" + n_c)`` (or ``FAILURE``).

Both digests are checked with :func:`hmac.compare_digest`; the labels keep a reply from being
reflected back. Both sides set socket receive/send timeouts (``SO_RCVTIMEO`` / ``SO_SNDTIMEO``:
a read that sees no data for that long fails with ``OSError``): the worker
:data:`HANDSHAKE_TIMEOUT_S` for the handshake and :data:`REQUEST_TIMEOUT_S` per read of a
request; a client waits up to its ``timeout_s`` (node config ``trainer-timeout``) for each read,
which covers the wait while the worker serves another request and its training time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

CHALLENGE, WELCOME, FAILURE = b"#FEDPANFM-CHALLENGE#", b"#FEDPANFM-WELCOME#", b"#FEDPANFM-FAILURE#"
NONCE_BYTES = 32
#: The worker's limit on each handshake step of a client (seconds).
HANDSHAKE_TIMEOUT_S = 10.0
#: The worker's limit on each read of a request once authenticated (seconds without data).
REQUEST_TIMEOUT_S = 120.0
#: A client's default limit on each read: the worker may be busy with another request, then training.
CLIENT_TIMEOUT_S = 6 * 3600.0


def _mac(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


def set_timeouts(conn: Connection, recv_s: float, send_s: float) -> None:
    """Bound every blocking read / write on ``conn`` (seconds; 0 = no limit)."""
    def timeval(seconds: float) -> bytes:
        whole = int(seconds)
        return struct.pack("ll", whole, int((seconds - whole) * 1e6))

    with socket.socket(fileno=os.dup(conn.fileno())) as s:  # the same socket; closing the dup only
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(recv_s))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send_s))


def authenticate_client(conn: Connection, key: bytes) -> None:
    """The worker's side; :class:`AuthenticationError` when the client does not hold the key."""
    nonce = os.urandom(NONCE_BYTES)
    conn.send_bytes(CHALLENGE + nonce)
    answer = conn.recv_bytes(256)
    expected = _mac(key, b"client", nonce)
    if len(answer) != len(expected) + NONCE_BYTES or not hmac.compare_digest(answer[:len(expected)], expected):
        conn.send_bytes(FAILURE)
        raise AuthenticationError("the client's digest is wrong (it does not hold the worker's key)")
    conn.send_bytes(WELCOME + _mac(key, b"worker", answer[len(expected):]))


def authenticate_worker(conn: Connection, key: bytes) -> None:
    """The client's side; :class:`AuthenticationError` when the worker refuses or cannot prove the key."""
    challenge = conn.recv_bytes(256)
    if not challenge.startswith(CHALLENGE) or len(challenge) != len(CHALLENGE) + NONCE_BYTES:
        raise AuthenticationError("the peer did not send a trainer-worker challenge")
    nonce = os.urandom(NONCE_BYTES)
    conn.send_bytes(_mac(key, b"client", challenge[len(CHALLENGE):]) + nonce)
    reply = conn.recv_bytes(256)
    if reply == FAILURE:
        raise AuthenticationError("the worker refused the key")
    if not reply.startswith(WELCOME) or not hmac.compare_digest(reply[len(WELCOME):], _mac(key, b"worker", nonce)):
        raise AuthenticationError("the worker could not prove it holds the key")


def accept_authenticated(listener: Listener, key: bytes) -> Connection:
    """The next client that completes the handshake within :data:`HANDSHAKE_TIMEOUT_S`.

    Raises:
        AuthenticationError, EOFError, OSError: this client failed (its connection is closed);
            the caller goes on to the next.
    """
    conn = listener.accept()
    try:
        set_timeouts(conn, HANDSHAKE_TIMEOUT_S, HANDSHAKE_TIMEOUT_S)
        authenticate_client(conn, key)
        set_timeouts(conn, REQUEST_TIMEOUT_S, REQUEST_TIMEOUT_S)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_authenticated(path: Path, key: bytes, timeout_s: float = CLIENT_TIMEOUT_S) -> Connection:
    """A connection to the worker at ``path`` after the mutual handshake.

    Args:
        path: the worker's Unix-domain socket.
        key: the shared key.
        timeout_s: the limit on each read and write (the worker may first finish another request).

    Raises:
        AuthenticationError, EOFError, OSError: no authenticated connection.
    """
    conn = Client(str(path), family="AF_UNIX")
    try:
        set_timeouts(conn, timeout_s, timeout_s)
        authenticate_worker(conn, key)
    except BaseException:
        conn.close()
        raise
    return conn


__all__ = ["CLIENT_TIMEOUT_S", "HANDSHAKE_TIMEOUT_S", "REQUEST_TIMEOUT_S", "accept_authenticated",
           "authenticate_client", "authenticate_worker", "connect_authenticated", "set_timeouts"]
