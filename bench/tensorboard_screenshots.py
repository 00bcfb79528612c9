"""The README's TensorBoard pictures, made again: ``python -m bench.tensorboard_screenshots``.

A developer tool (not run in CI, needs Chromium: Debian ``apt-get install -y
--no-install-recommends chromium``). It lives in ``bench/`` beside the other scripts that
measure the project; the pictures it writes live in ``docs/images/``, where the README shows
them. It

1. runs the README's main job into ``runs/quickstart-screenshots-<time>`` (``fedpanfm
   simulate --config configs/quickstart.yaml``, about a minute on 2 cores) and keeps its console
   output in ``console.txt`` there, or takes an existing run folder with ``--run DIR``;
2. serves that run's ``tensorboard/`` folder with TensorBoard on loopback, on a free port, as a
   child process it stops (that PID only) when done, on error too;
3. photographs two dashboards with headless Chromium: SCALARS filtered to the progress tags
   (probe AUROC, train / validation loss, the sites' per-step loss) and IMAGES filtered to the
   per-round pictures (organ saliency and mask rate, expert usage, the student's view);
4. sizes each window to the dashboard's first pane and stores the picture as a palette PNG
   under ``--out`` (default ``docs/images/``): ``tensorboard-scalars.png``, ``tensorboard-images.png``.

Two details are ours, for pictures that show the data: smoothing is set to 0 in the URL (a
3-round run smoothed at TensorBoard's default 0.6 hides its own points), and "ignore outliers in
chart scaling" is switched off. TensorBoard keeps that switch in the browser's localStorage, not
in the URL, so before TensorBoard starts a one-page server on the same loopback port writes it
into a throw-away Chromium profile that the screenshots then use (localStorage is per origin,
and the origin is host and port).
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("install it (Debian/Ubuntu: apt-get install -y --no-install-recommends chromium), "
                "or name the binary with --chromium PATH or the CHROMIUM environment variable")
MAX_BYTES = 400_000


@dataclass(frozen=True)
class Shot:
    """One dashboard picture: where it goes, what it shows, and how much of the page to keep."""

    file: str
    dashboard: str
    tag_filter: str
    window: tuple[int, int]


SHOTS = (
    Shot("tensorboard-scalars.png", "scalars", r"^(probe/auroc_macro|train/loss|val/loss|loss/total)$", (1400, 840)),
    Shot("tensorboard-images.png", "images", r"^(organs|masks|experts)/", (1400, 830)),
)


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on at ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dashboard_url(port: int, dashboard: str, tag_filter: str = "", smoothing: float = 0.0,
                  host: str = HOST) -> str:
    """TensorBoard's address of one dashboard, its tag filter (a regex) and smoothing in the hash."""
    if not dashboard.isidentifier():
        raise ValueError(f"dashboard {dashboard!r}: a TensorBoard plugin name such as 'scalars'")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing {smoothing}: must be in [0, 1)")
    parts = [dashboard]
    if tag_filter:
        parts.append("tagFilter=" + urllib.parse.quote(tag_filter, safe=""))
    parts.append(f"_smoothingWeight={smoothing:g}")
    return f"http://{host}:{port}/#" + "&".join(parts)


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium binary: ``explicit``, else ``$CHROMIUM``, else the first on ``PATH``; a clear
    error (how to install it) when there is none."""
    wanted = explicit or os.environ.get("CHROMIUM")
    if wanted:
        found = shutil.which(wanted)
        if found is None:
            raise FileNotFoundError(f"chromium {wanted!r} not found or not executable: {INSTALL_HINT}")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): {INSTALL_HINT}")


def chromium_command(binary: str, profile: Path, url: str, *, png: Path | None = None,
                     window: tuple[int, int] = (1400, 900), budget_ms: int = 15_000) -> list[str]:
    """Headless Chromium loading ``url`` in ``profile`` for ``budget_ms`` of virtual time (what
    TensorBoard's single-page app needs to fetch and draw), then screenshotting to ``png``."""
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
           f"--virtual-time-budget={budget_ms}"]
    cmd.append(f"--screenshot={png}" if png is not None else "--dump-dom")
    return [*cmd, url]


def run_chromium(cmd: list[str], timeout_s: float = 180.0) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"chromium exited {r.returncode}: {r.stderr.strip()[-2000:]}")


_SEED_PAGE = (b"<!doctype html><title>seed</title><script>"
              b"localStorage.setItem('_ignoreYOutliers', 'false');</script>")


class _SeedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(_SEED_PAGE)))
        self.end_headers()
        self.wfile.write(_SEED_PAGE)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass


def seed_profile(binary: str, profile: Path) -> int:
    """Write TensorBoard's chart settings (module doc) into ``profile``'s localStorage for a fresh
    loopback port, and return that port (now free again) for TensorBoard to serve on."""
    server = http.server.ThreadingHTTPServer((HOST, 0), _SeedHandler)
    port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run_chromium(chromium_command(binary, profile, f"http://{HOST}:{port}/", budget_ms=2000))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return port


def wait_for_tensorboard(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> list[str]:
    """Poll TensorBoard until it answers with the same non-empty run list twice in a row (it
    loads the runs in the background); its run names."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"TensorBoard exited {proc.returncode} before answering:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/data/runs", timeout=5) as r:
                runs = json.loads(r.read())
            if runs and [str(x) for x in runs] == seen:
                return seen
            seen = [str(x) for x in runs]
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard on port {port} did not list its runs within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no output)"


def start_tensorboard(run: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """TensorBoard on loopback serving ``run/tensorboard``, loaded once (its output to ``log``).

    Started from the run's parent folder with a relative logdir, so the page names the run
    folder rather than this machine's path to it."""
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", f"{run.name}/tensorboard",
                                 "--host", HOST, "--port", str(port), "--reload_interval", "0"],
                                cwd=run.parent, stdout=fh, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop exactly this child: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def fit_png(raw: Path, dest: Path, max_bytes: int = MAX_BYTES) -> int:
    """``raw`` as a palette PNG at ``dest`` (screenshots keep their look at 256 colours), halved
    in size until it fits ``max_bytes``; its size in bytes."""
    from PIL import Image

    img = Image.open(raw).convert("RGB")
    while True:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or img.width < 400:
            break
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS)
    if buf.tell() > max_bytes:
        raise RuntimeError(f"{dest.name}: {buf.tell()} bytes even at {img.width} px wide (limit {max_bytes})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return buf.tell()


def run_quickstart(out: Path) -> Path:
    """The README's main job into ``out``; its console output kept in ``out/console.txt``."""
    cmd = [sys.executable, "-m", "fedpanfm.cli", "simulate", "--config", "configs/quickstart.yaml", "--out", str(out)]
    print("[shots] " + " ".join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "console.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"the quickstart exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
    print(r.stdout + r.stderr, flush=True)
    return out


def take(run: Path, out_dir: Path, binary: str, budget_ms: int) -> list[Path]:
    """Serve ``run/tensorboard`` and photograph :data:`SHOTS` into ``out_dir``."""
    logdir = run / "tensorboard"
    if not (logdir / "server").is_dir():
        raise FileNotFoundError(f"{logdir}: no server sub-run; --run must be a fedpanfm simulate run folder")
    written = []
    with tempfile.TemporaryDirectory(prefix="tb-shots-") as tmp:
        profile = Path(tmp) / "profile"
        port = seed_profile(binary, profile)
        proc = start_tensorboard(run.resolve(), port, Path(tmp) / "tensorboard.log")
        print(f"[shots] TensorBoard pid {proc.pid} on http://{HOST}:{port}/ serving {logdir}", flush=True)
        try:
            runs = wait_for_tensorboard(port, proc, Path(tmp) / "tensorboard.log")
            print(f"[shots] TensorBoard lists {len(runs)} runs", flush=True)
            for shot in SHOTS:
                raw = Path(tmp) / shot.file
                url = dashboard_url(port, shot.dashboard, shot.tag_filter)
                run_chromium(chromium_command(binary, profile, url, png=raw, window=shot.window, budget_ms=budget_ms))
                size = fit_png(raw, out_dir / shot.file)
                print(f"[shots] {out_dir / shot.file}: {size / 1000:.0f} kB from {url}", flush=True)
                written.append(out_dir / shot.file)
        finally:
            stop(proc)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tensorboard_screenshots", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="an existing simulate run folder (default: run the quickstart now)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="where the PNGs go")
    p.add_argument("--chromium", help="the Chromium binary (default: $CHROMIUM or chromium on PATH)")
    p.add_argument("--budget-ms", type=int, default=15_000,
                   help="virtual time Chromium gives TensorBoard to draw each page")
    a = p.parse_args(argv)
    try:
        binary = find_chromium(a.chromium)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = a.run or run_quickstart(REPO / "runs" / time.strftime("quickstart-screenshots-%Y%m%d-%H%M%S"))
    for path in take(run, a.out, binary, a.budget_ms):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
