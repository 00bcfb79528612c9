"""The site's trainer worker: one long-lived process that keeps the DeepSpeed engine across rounds.

Why: Flower 1.41 starts a fresh ClientApp process for every message (docs/deployment.md,
"Engine reuse"), so in-process training pays the torch / DeepSpeed imports and an engine build
per message. ``fedpanfm site start`` therefore starts this worker next to the SuperNode and
passes its address in the node config (``trainer-socket``, ``trainer-key``,
``trainer-fallback``); the per-message ClientApp stays thin (no torch import) and forwards the
message content and the site's ``context.state`` here. The worker runs the very same
``train_site`` / ``evaluate_site`` as in-process training and sends back the reply content and
the updated state.

Transport: ``multiprocessing.connection`` over a Unix-domain socket in the site's state folder
(mode 0700), authenticated with a random key from a 0600 file beside it. Only bytes cross it,
never pickles (``send_bytes`` / ``recv_bytes``, not ``send``): frame 0 is a JSON header, every
further frame is one array's payload exactly as Flower's ``Array`` holds it (.npy bytes, read
back with ``allow_pickle=False`` or a header parse that rejects object dtypes, or raw bf16).

The worker serves one request at a time: a second ClientApp's connection waits in the
listen backlog until the engine is free.

A resumed run (run config ``resume``) is a new Flower run, so the SuperNode hands its first
message an empty ``context.state``. The worker outlives runs: it keeps the site's state after
each of the last :data:`KEPT_ROUNDS` rounds per run folder, and gives a resumed run's first
train call the state kept after the newest earlier round, which is what the site would have
held in the uninterrupted run (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

log = logging.getLogger(__name__)

WIRE_VERSION = 1
#: Node config keys naming the worker (written by ``SiteConfig.node_config(worker=True)``).
NODE_SOCKET, NODE_KEY, NODE_FALLBACK = "trainer-socket", "trainer-key", "trainer-fallback"
#: ``local``: train in the ClientApp process when the worker does not answer; ``fail``: raise.
FALLBACKS = ("local", "fail")
OPS = ("train", "evaluate")
#: sun_path holds 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
KEY_BYTES = 32
#: Rounds of site state the worker keeps per run folder, and run folders it keeps them for.
KEPT_ROUNDS, KEPT_RUNS = 3, 4


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


# --------------------------------------------------------------------------- client (thin ClientApp)


@dataclass(frozen=True)
class WorkerTarget:
    """Where a ClientApp finds its site's worker.

    Args:
        socket: the worker's Unix-domain socket.
        key: the auth key file.
        fallback: "local" (train in-process when the worker does not answer) or "fail".
    """

    socket: Path
    key: Path
    fallback: str = "local"

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
        return cls(sock, key, fallback)

    def connect(self) -> Connection:
        """An authenticated connection; :class:`WorkerUnavailable` when none can be made."""
        key = read_authkey(self.key)
        try:
            return Client(str(self.socket), family="AF_UNIX", authkey=key)
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


def ping(target: WorkerTarget) -> dict[str, Any]:
    """The worker's stats (pid, requests served, engines built); raises when it does not answer."""
    reply, _ = _exchange(target, {"op": "ping"}, [])
    return dict(reply["stats"])


# --------------------------------------------------------------------------- server


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
            listener = Listener(str(self.socket_path), family="AF_UNIX", backlog=16, authkey=self.key)
        finally:
            os.umask(old)
        with listener:
            log.info("trainer worker %d listening on %s", os.getpid(), self.socket_path)
            served = 0
            while max_requests is None or served < max_requests:
                try:
                    conn = listener.accept()
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
        from fedpanfm.config import config_from_run_config
        from fedpanfm.train.engine import clear_trainer_cache, get_trainer, trainer_key
        from sites.client_app import evaluate_site, train_site

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
        msg = Message(content=content, metadata=Metadata(reply_to_message_id="", created_at=time.time(), **meta))
        cfg = config_from_run_config(context.run_config)
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
    from fedpanfm.federation.message import SERVER_CONFIG

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


def _exit_with_parent(parent_pid: int) -> None:
    # The worker must not outlive `site start`, even when that is killed with SIGKILL.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("parent %d is gone: trainer worker exits", parent_pid)
    os._exit(0)


# --------------------------------------------------------------------------- supervision (site start)


class WorkerProcess:
    """The worker as a child process of ``fedpanfm site start``, restarted when it dies.

    Args:
        socket_path: its socket.
        key_path: its auth key file (created here, mode 0600, if missing).
        env: its environment (the SuperNode's: threads, CUDA_VISIBLE_DEVICES).
        log_path: its log file (appended).
        restarts: how many times a worker that died is started again.
    """

    def __init__(self, socket_path: Path, key_path: Path, env: Mapping[str, str], log_path: Path,
                 restarts: int = 10) -> None:
        self.target = WorkerTarget(socket_path, key_path)
        self.env, self.log_path, self.restarts = dict(env), log_path, restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "sites.worker", "--socket", str(self.target.socket),
               "--key", str(self.target.key), "--parent-pid", str(os.getpid())]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.env)

    def start(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Start the worker and wait until it answers; its stats. Raises naming the log on failure."""
        self.target.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.target.socket.parent, 0o700)
        ensure_authkey(self.target.key)
        self._spawn()
        stats = self._wait_ready(timeout_s)
        self._watch = threading.Thread(target=self._supervise, name="trainer-worker-watch", daemon=True)
        self._watch.start()
        return stats

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer worker exited ({self.proc.returncode}) at start; see {self.log_path}")
            try:
                return ping(self.target)
            except WorkerUnavailable:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"trainer worker did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def _supervise(self) -> None:
        for attempt in range(self.restarts + 1):
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set() or attempt == self.restarts:
                return
            print(f"trainer worker exited ({code}); restarting ({attempt + 1}/{self.restarts}), see "
                  f"{self.log_path}", file=sys.stderr, flush=True)
            time.sleep(2.0)
            if self._stopping.is_set():
                return
            self._spawn()

    def stop(self) -> None:
        """Stop the worker by its PID (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """``python -m sites.worker --socket PATH --key PATH``: run a worker in the foreground."""
    ap = argparse.ArgumentParser(prog="python -m sites.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, type=Path, help="Unix-domain socket to listen on")
    ap.add_argument("--key", required=True, type=Path, help="auth key file (mode 0600)")
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = TrainerWorker(args.socket, args.key)

    def on_term(*_: object) -> None:
        raise SystemExit(0)  # unwinds accept() / training; the listener's close removes the socket

    signal.signal(signal.SIGTERM, on_term)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # Import torch, DeepSpeed and the app now, not in the first round.
    import fedpanfm.train.engine  # noqa: F401
    import sites.client_app  # noqa: F401

    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
