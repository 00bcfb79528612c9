"""A site's side of a deployment without a coordinator: why `site start` stopped, read from
the SuperNode's log as Flower 1.41 writes it; `site check` names the site by its name; and the
ClientApp processes a dead SuperNode left are ended, the trainer worker is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY, make_site, tiny_config

from sites.site_commands import check_data, stop_reason
from sites.site_config import load_site_config

# The tail of supernode.log for a key the coordinator never registered, as tests/orchestration/test_deployment.py
# produced it (colour codes included).
REFUSED = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
INFO:     Uvicorn running on http://127.0.0.1:33293 (Press CTRL+C to quit)
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""
NO_CA = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)
"""


def _site(tmp_path: Path):
    make_site(tmp_path / "data", tiny_config(), {"s0": ["heart"], "s1": ["heart"]})
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({"site_name": "hospital_x", "data_dir": "data",
                                                        "experiment": "experiment.yaml",
                                                        "coordinator": "coord.example.org:9092"}))
    return load_site_config(tmp_path / "site.yaml")


def test_stop_reason_reads_the_last_start_of_the_log(tmp_path: Path) -> None:
    site = _site(tmp_path)
    refused = stop_reason(REFUSED, site)
    assert refused.startswith(f"the coordinator refused this site's key {site.auth_key}: it is not registered")
    assert "fedpanfm server register" in refused
    assert stop_reason(NO_CA, site).startswith(f"TLS: the coordinator coord.example.org:9092 presents a certificate "
                                               f"the CA {site.ca_cert} does not trust")
    # An earlier start's refusal is history: only what the last start wrote counts.
    other = "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n\x1b[91mERROR \x1b[0m:     disk full\n"
    assert stop_reason(REFUSED + other, site) == "disk full"
    assert stop_reason("", site) == "no reason in its log"


def test_check_data_names_the_site_by_its_name(tmp_path: Path) -> None:
    table = check_data(_site(tmp_path))
    assert "hospital_x" in table and "data " not in table.splitlines()[2]


# Run in a process of its own: ending "every descendant" of the pytest process would end
# other tests' helpers (a Ray started in-process).
SITE_START = """
import json, subprocess, sys, time
import psutil
from fedpanfm.supervision import end_descendants, set_child_subreaper
set_child_subreaper()
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
worker = subprocess.Popen(sleep)
# A SuperNode that starts a ClientApp in its own session, then dies: the ClientApp is orphaned.
node = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                         "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
                         "start_new_session=True).pid)"], stdout=subprocess.PIPE, text=True)
clientapp = int(node.stdout.readline())
node.wait()
time.sleep(0.3)
adopted = psutil.Process(clientapp).ppid()
ended = end_descendants(grace_s=5.0, keep=[worker.pid])
print(json.dumps({"worker": worker.pid, "clientapp": clientapp, "adopted_by": adopted, "me": __import__("os").getpid(),
                  "ended": ended, "clientapp_alive": psutil.pid_exists(clientapp), "worker_alive": worker.poll() is None}))
worker.kill()
"""


def test_end_descendants_ends_an_orphaned_clientapp_and_keeps_the_worker() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", SITE_START], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["adopted_by"] == r["me"]  # the subreaper adopted the orphan
    assert r["ended"] == [r["clientapp"]] and not r["clientapp_alive"] and r["worker_alive"]
