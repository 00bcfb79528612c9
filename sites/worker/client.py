"""The thin ClientApp's side of the trainer worker: find it, send it a message, read its reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from sites.worker.handshake import CLIENT_TIMEOUT_S, connect_authenticated
from sites.worker.wire import (
    OPS,
    WorkerError,
    WorkerUnavailable,
    decode_recorddict,
    encode_recorddict,
    read_authkey,
    recv_frames,
    send_frames,
)

#: Node config keys naming the worker (written by ``SiteConfig.node_config(worker=True)``).
NODE_SOCKET, NODE_KEY, NODE_FALLBACK = "trainer-socket", "trainer-key", "trainer-fallback"
#: ``local``: train in the ClientApp process when the worker does not answer; ``fail``: raise.
FALLBACKS = ("local", "fail")


@dataclass(frozen=True)
class WorkerTarget:
    """Where a ClientApp finds its site's worker.

    Args:
        socket: the worker's Unix-domain socket.
        key: the auth key file.
        fallback: "local" (train in-process when the worker does not answer) or "fail".
        timeout_s: the limit on each read from the worker (node config ``trainer-timeout``).
    """

    socket: Path
    key: Path
    fallback: str = "local"
    timeout_s: float = CLIENT_TIMEOUT_S

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "WorkerTarget | None":
        """The target named by the node config; None when it names no ``trainer-socket``."""
        if NODE_SOCKET not in node_config:
            return None
        sock = Path(str(node_config[NODE_SOCKET]))
        key = Path(str(node_config.get(NODE_KEY, sock.with_suffix(".key"))))
        fallback = str(node_config.get(NODE_FALLBACK, "local"))
        if fallback not in FALLBACKS:
            raise ValueError(f"node config {NODE_FALLBACK}={fallback!r} is not one of {FALLBACKS}")
        return cls(sock, key, fallback, float(node_config.get("trainer-timeout", CLIENT_TIMEOUT_S)))

    def connect(self) -> Connection:
        """An authenticated connection; :class:`WorkerUnavailable` when none can be made."""
        key = read_authkey(self.key)
        try:
            return connect_authenticated(self.socket, key, self.timeout_s)
        except AuthenticationError as exc:
            raise WorkerUnavailable(f"trainer worker at {self.socket} refused the key {self.key}: {exc}") from None
        except EOFError:
            # Accepted by the kernel, then closed during the handshake: the worker died just then.
            raise WorkerUnavailable(f"trainer worker at {self.socket} closed the connection during the "
                                    "handshake") from None
        except OSError as exc:
            raise WorkerUnavailable(f"no trainer worker at {self.socket}: {exc}") from None


def _exchange(target: WorkerTarget, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    with target.connect() as conn:
        try:
            send_frames(conn, header, blobs)
            reply, reply_blobs = recv_frames(conn, f"trainer worker at {target.socket}")
        except (EOFError, OSError) as exc:
            raise WorkerUnavailable(f"trainer worker at {target.socket} closed the connection before "
                                    f"replying ({type(exc).__name__}: {exc}); see its log") from None
    if not reply.get("ok"):
        raise WorkerError(f"trainer worker: {reply.get('error', 'failed without a message')}")
    return reply, reply_blobs


def call_worker(target: WorkerTarget, op: str, msg: Message, context: Context,
                run_config: Mapping[str, Any]) -> tuple[RecordDict, dict[str, Any]]:
    """Run ``op`` on the worker: (reply content, worker stats); ``context.state`` is updated in place.

    Args:
        target: the worker.
        op: "train" or "evaluate".
        msg: the server's message.
        context: this call's context (its node config and state travel to the worker).
        run_config: the run config the experiment config is resolved from.
    """
    if op not in OPS:
        raise ValueError(f"call_worker: op {op!r} is not one of {OPS}")
    blobs: list[bytes] = []
    md = msg.metadata
    header = {
        "op": op,
        "message": {"run_id": md.run_id, "message_id": md.message_id, "src_node_id": md.src_node_id,
                    "dst_node_id": md.dst_node_id, "group_id": md.group_id, "ttl": md.ttl,
                    "message_type": md.message_type},
        "context": {"run_id": context.run_id, "node_id": context.node_id,
                    "node_config": dict(context.node_config), "run_config": dict(run_config)},
        "content": encode_recorddict(msg.content, blobs, f"{op} message content"),
        "state": encode_recorddict(context.state, blobs, "context state"),
    }
    reply, reply_blobs = _exchange(target, header, blobs)
    where = f"trainer worker at {target.socket}"
    content = decode_recorddict(reply.get("content"), reply_blobs, f"{where}: reply content")
    state = decode_recorddict(reply.get("state"), reply_blobs, f"{where}: context state")
    for name in [k for k in context.state.keys() if k not in state]:
        del context.state[name]
    for name, rec in state.items():
        context.state[name] = rec
    return content, dict(reply.get("stats", {}))


def ping(target: WorkerTarget, timeout_s: float = 30.0) -> dict[str, Any]:
    """The worker's stats (pid, requests served, engines built); raises when it does not answer
    within ``timeout_s`` per read."""
    reply, _ = _exchange(replace(target, timeout_s=timeout_s), {"op": "ping"}, [])
    return dict(reply["stats"])
