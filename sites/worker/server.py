"""The trainer worker process: serves train / evaluate requests with one long-lived engine.

It runs the very same site handlers as in-process training (``sites/handlers.py``) and keeps
the site's state after the last rounds of each run, so a resumed run continues from it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from sites.worker.handshake import accept_authenticated
from sites.worker.wire import (
    OPS,
    WorkerProtocolError,
    check_socket_path,
    decode_recorddict,
    encode_recorddict,
    read_authkey,
    recv_frames,
    send_frames,
)

log = logging.getLogger(__name__)

#: Rounds of site state the worker keeps per run folder, and run folders it keeps them for.
KEPT_ROUNDS, KEPT_RUNS = 3, 4


class TrainerWorker:
    """Serves train / evaluate requests on one socket, keeping the engine between them.

    Args:
        socket_path: the Unix-domain socket to listen on (created mode 0600).
        key_path: the auth key file (made by :func:`ensure_authkey`).
    """

    def __init__(self, socket_path: Path, key_path: Path) -> None:
        check_socket_path(socket_path, "trainer worker --socket")
        self.socket_path = socket_path
        self.key = read_authkey(key_path)
        self.requests = 0
        self.engine_builds = 0
        self._engine_key: str | None = None
        #: run folder -> server round -> the site's ``context.state`` after training it.
        self.kept: dict[str, dict[int, RecordDict]] = {}

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "requests": self.requests, "engine_builds": self.engine_builds}

    def serve(self, max_requests: int | None = None) -> None:
        """Accept connections until stopped (SIGTERM / SIGINT) or ``max_requests`` were served."""
        _remove_stale_socket(self.socket_path)
        old = os.umask(0o177)  # the socket file is created by bind(): owner-only from the start
        try:
            # The handshake is ours (sites/worker/handshake.py: constant-time, with timeouts).
            listener = Listener(str(self.socket_path), family="AF_UNIX", backlog=16)
        finally:
            os.umask(old)
        with listener:
            log.info("trainer worker %d listening on %s", os.getpid(), self.socket_path)
            served = 0
            while max_requests is None or served < max_requests:
                try:
                    conn = accept_authenticated(listener, self.key)
                except (AuthenticationError, EOFError, OSError) as exc:
                    log.warning("refused a connection: %s: %s", type(exc).__name__, exc)
                    continue
                with conn:
                    self._serve_one(conn)
                served += 1

    def _serve_one(self, conn: Connection) -> None:
        t0 = time.perf_counter()
        header: dict[str, Any] = {}
        try:
            header, blobs = recv_frames(conn, "client")
            op = header.get("op")
            if op == "ping":
                send_frames(conn, {"ok": True, "stats": self.stats()}, [])
                return
            self.requests += 1
            content, state = self.handle(header, blobs)
            out: list[bytes] = []
            reply = {"ok": True, "content": encode_recorddict(content, out, "reply content"),
                     "state": encode_recorddict(state, out, "context state"),
                     "stats": {**self.stats(), "seconds": time.perf_counter() - t0}}
        except (EOFError, OSError) as exc:
            log.warning("client went away: %s: %s", type(exc).__name__, exc)
            return
        except Exception as exc:  # the reason travels back; the ClientApp raises it
            log.exception("request failed")
            reply, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
        try:
            send_frames(conn, reply, out)
        except OSError as exc:
            log.warning("could not send the reply: %s", exc)
        log.info("served %s in %.2f s", header.get("op") if reply.get("ok") else "a failed request",
                 time.perf_counter() - t0)

    def handle(self, header: dict[str, Any], blobs: list[bytes]) -> tuple[RecordDict, RecordDict]:
        """Run one train / evaluate request: (reply content, the site's updated state)."""
        from fedpanfm.train.engine import clear_trainer_cache, get_trainer, trainer_key
        from sites.handlers import evaluate_site, train_site
        from sites.run_config_allowlist import site_experiment_config

        op = header.get("op")
        if op not in OPS:
            raise WorkerProtocolError(f"client: op {op!r} is not one of {OPS}")
        ctx, meta = header.get("context"), header.get("message")
        if not isinstance(ctx, dict) or not isinstance(meta, dict):
            raise WorkerProtocolError("client: header lacks 'context' or 'message'")
        content = decode_recorddict(header.get("content"), blobs, f"{op} message content")
        state = decode_recorddict(header.get("state"), blobs, "context state")
        run_folder, server_round = _run_round(ctx.get("run_config"), content) if op == "train" else ("", 0)
        if run_folder and not len(state) and ctx.get("run_config", {}).get("resume"):
            state = self.restore(run_folder, server_round)
        context = Context(run_id=int(ctx["run_id"]), node_id=int(ctx["node_id"]), node_config=ctx["node_config"],
                          state=state, run_config=ctx["run_config"])
        # Flower's public overloads omit the (runtime-supported) metadata form used to rebuild a message.
        msg = Message(content=content, metadata=Metadata(reply_to_message_id="", created_at=time.time(), **meta))  # type: ignore[call-overload]
        cfg = site_experiment_config(context.run_config, context.node_config)  # the site's allowlist
        key = trainer_key(cfg)
        if key != self._engine_key:
            # Another experiment: keep one engine, not one per run this site ever served.
            clear_trainer_cache()
            get_trainer(cfg)
            self._engine_key = key
            self.engine_builds += 1
        reply = (train_site if op == "train" else evaluate_site)(msg, context, cfg)
        if run_folder:
            self.remember(run_folder, server_round, context.state)
        return reply.content, context.state

    def remember(self, run_folder: str, server_round: int, state: RecordDict) -> None:
        """Keep the site's state after ``server_round`` of the run in ``run_folder`` (the last
        :data:`KEPT_ROUNDS` rounds of the last :data:`KEPT_RUNS` runs)."""
        rounds = self.kept.pop(run_folder, {})
        rounds[server_round] = state
        for old in sorted(rounds)[:-KEPT_ROUNDS]:
            del rounds[old]
        self.kept[run_folder] = rounds  # re-inserted: the dict's order is the order of use
        for old_run in list(self.kept)[:-KEPT_RUNS]:
            del self.kept[old_run]

    def restore(self, run_folder: str, server_round: int) -> RecordDict:
        """The state kept after the newest round before ``server_round`` of ``run_folder``'s run
        (empty when none is kept: the site starts afresh, as after a restart of the worker)."""
        earlier = [r for r in self.kept.get(run_folder, {}) if r < server_round]
        if not earlier:
            log.info("resumed run %s round %d: no site state kept here; the site starts it afresh",
                     run_folder, server_round)
            return RecordDict()
        log.info("resumed run %s round %d: continuing from the site state kept after round %d",
                 run_folder, server_round, max(earlier))
        return self.kept[run_folder][max(earlier)]


def _run_round(run_config: Any, content: RecordDict) -> tuple[str, int]:
    """(the run folder a train message belongs to, its server round); ("", 0) when either is
    not there. The folder names the run across a resume (``resume`` = the folder it continues)."""
    from fedpanfm.federation.protocol import SERVER_CONFIG

    if not isinstance(run_config, Mapping):
        return "", 0
    folder = str(run_config.get("resume") or run_config.get("run-folder") or "")
    rec = content.get(SERVER_CONFIG) if SERVER_CONFIG in content else None
    server_round = rec.get("server-round") if isinstance(rec, ConfigRecord) else None
    if not folder or not isinstance(server_round, int) or server_round < 1:
        return "", 0
    return folder, server_round


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a worker that died; refuse if a live worker answers on it."""
    if not path.exists():
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise ValueError(f"trainer socket path {path} exists and is not a socket")
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise ValueError(f"another trainer worker already listens on {path}")
