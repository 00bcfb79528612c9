"""Sites run only app code they approved: a pinned SHA-256 of the Flower app bundle (FAB).

In a deployment the coordinator's ``flwr run`` uploads the app as a FAB (a zip of the project,
built with fixed timestamps, so the same files give the same bytes), and every site's SuperNode
unpacks it and imports its ClientApp from it: the code that runs at a site is whatever the
coordinator sent, not what the site installed.

Flower 1.41's own answer, ``flower-supernode --trusted-entities``, checks Ed25519 signatures that
only Flower Hub attaches to a FAB (its ``verifications`` with ``valid_license``); a FAB built from
a local project carries none, and such a SuperNode refuses it ("App verification is not supported
by the connected SuperLink"; flwr/supernode/start_client_internal.py). A consortium with its own
SuperLink cannot use it. Our design instead: the site lists the SHA-256 of each FAB it reviewed
(``approved_apps`` in ``site.yaml``; ``fedpanfm site approve-app`` computes it from the site's
own checkout, the hash Flower itself computes, ``Fab.hash_str``), and the check runs before any
of the FAB's files are unpacked or imported. Deny by default: a site that approved none does not
start (``site check`` and ``site start`` say so) unless its ``site.yaml`` opts out for
development with ``allow_any_app: true``.

- the SuperNode starts each ClientApp as the command ``flwr-clientapp`` found on its ``PATH``
  (flwr/supercore/superexec/executor/subprocess_executor.py). ``site start`` puts our
  ``flwr-clientapp`` first on the SuperNode's ``PATH`` (:func:`write_clientapp_shim`): it runs
  Flower's own entry point with the FAB installation step (``install_from_fab``, the first use
  of the FAB's content, before the ClientApp is loaded) guarded by :func:`guard_fab_install`;
- the approved hashes reach it in :data:`APPROVED_ENV` (the SuperNode's environment, which the
  coordinator cannot set). Unset or empty, the shim refuses every FAB (fail closed);
- an unapproved FAB raises :class:`AppNotApproved`: Flower replies an error to the coordinator
  (``app bundle sha256 ... is not approved by this site``), and nothing of the FAB runs.

What this does not cover: the site's own Python environment (the packages it installed) and a
SuperNode started by hand without ``site start``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sites.public_errors import PublicError

#: Environment variable of the SuperNode naming the approved FAB hashes (comma-separated).
APPROVED_ENV = "FEDPANFM_APPROVED_APPS"
#: The command the SuperNode starts per message (flwr.supercore.constant.TASK_TYPE_TO_COMMAND).
CLIENTAPP_COMMAND = "flwr-clientapp"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AppNotApproved(PublicError, PermissionError):
    """The app bundle the coordinator sent is not one this site approved."""


def check_app_hash(digest: str, where: str) -> str:
    """``digest`` if it is a SHA-256 in lower-case hex; ValueError naming ``where`` otherwise."""
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ValueError(f"{where}: {digest!r} is not a SHA-256 hash (64 lower-case hex digits, as "
                         "`fedpanfm site approve-app` prints)")
    return digest


def project_root() -> Path:
    """The Flower app folder of the installed project (the folder holding ``pyproject.toml``)."""
    return Path(__file__).resolve().parents[1]


def app_hash(app_dir: Path) -> str:
    """The SHA-256 of the FAB Flower builds from ``app_dir`` (what ``flwr run`` uploads).

    Args:
        app_dir: the Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``).
    """
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def verify_app(fab: bytes, approved: Iterable[str]) -> str:
    """The FAB's hash when it is approved; :class:`AppNotApproved` otherwise.

    Args:
        fab: the FAB's bytes as received (hashed here, never taken from the message).
        approved: the approved hashes.
    """
    digest = hashlib.sha256(fab).hexdigest()
    if digest not in set(approved):
        raise AppNotApproved(f"app bundle sha256 {digest} is not approved by this site (its site.yaml "
                             "approved_apps); the site's operator reviews the release and runs "
                             "`fedpanfm site approve-app`")
    return digest


def approved_from_env(env: dict[str, str] | None = None) -> list[str]:
    """The approved hashes named by :data:`APPROVED_ENV` (empty when unset)."""
    text = (env if env is not None else dict(os.environ)).get(APPROVED_ENV, "")
    return [check_app_hash(h.strip(), APPROVED_ENV) for h in text.split(",") if h.strip()]


def guard_fab_install(approved: Iterable[str]) -> Callable[..., Any]:
    """Make Flower's ClientApp runtime verify each FAB before installing it; returns the original.

    Patches ``install_from_fab`` in ``flwr.supernode.runtime.run_clientapp`` (Flower 1.41), which
    ``run_clientapp`` calls on the pulled FAB before loading the ClientApp from it
    (tests/sites/test_site_trust.py pins that order in Flower's source).

    Args:
        approved: the approved hashes.
    """
    import flwr.supernode.runtime.run_clientapp as runtime

    allowed = frozenset(approved)
    original = runtime.install_from_fab

    def install_approved(fab_file: bytes | Path, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            verify_app(content, allowed)
        except AppNotApproved as exc:
            # In the site's log (the SuperNode's output) as well as in the reply the coordinator gets.
            from flwr.common.logger import log

            log(logging.ERROR, "refused the app the coordinator sent: %s", exc)
            raise
        return original(fab_file, *args, **kwargs)

    runtime.install_from_fab = install_approved
    return original


def clientapp_main() -> int:
    """``flwr-clientapp`` with the FAB checked against :data:`APPROVED_ENV` first."""
    guard_fab_install(approved_from_env())
    from flwr.supernode.cli import flwr_clientapp

    sys.argv[0] = CLIENTAPP_COMMAND  # Flower's exit handling looks at the program name
    flwr_clientapp()
    return 0


def write_clientapp_shim(bin_dir: Path) -> Path:
    """Write our ``flwr-clientapp`` into ``bin_dir`` (mode 0700) for the SuperNode's ``PATH``.

    Args:
        bin_dir: a folder of the site's own (``<worker.state_dir>/bin``).
    """
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shim = bin_dir / CLIENTAPP_COMMAND
    shim.write_text(f"#!{sys.executable}\n# fedpanfm site start: Flower's flwr-clientapp, FAB hash checked first "
                    "(sites/approved_app.py)\nimport sys\nfrom sites.approved_app import clientapp_main\n"
                    "sys.exit(clientapp_main())\n")
    shim.chmod(stat.S_IRWXU)
    return shim


def approve_in_site_yaml(path: Path, digest: str, current: list[str]) -> list[str]:
    """Add ``digest`` to ``approved_apps`` of the site YAML at ``path``; the list after.

    The ``approved_apps`` entry is rewritten as one line at the end of the file and an
    ``allow_any_app`` line is dropped (an approved app ends development mode); the rest of the
    file (comments included) is kept. Load the file again to check it.

    Args:
        path: the site YAML.
        digest: the FAB hash to approve.
        current: its ``approved_apps`` now (``load_site_config(path).approved_apps``).
    """
    check_app_hash(digest, "approve-app")
    approved = [*current, digest] if digest not in current else list(current)
    lines = path.read_text().splitlines()
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("approved_apps:"):
            skipping = True
            continue
        if line.startswith("allow_any_app:"):
            continue
        if skipping and (line.startswith((" ", "\t", "-")) or not line.strip()):
            continue
        skipping = False
        kept.append(line)
    kept.append(f"approved_apps: [{', '.join(approved)}]")
    path.write_text("\n".join(kept) + "\n")
    return approved


__all__ = ["APPROVED_ENV", "AppNotApproved", "app_hash", "approve_in_site_yaml", "approved_from_env",
           "check_app_hash", "clientapp_main", "guard_fab_install", "project_root", "verify_app",
           "write_clientapp_shim"]
