"""``fedpanfm certs init`` and ``fedpanfm certs add-site`` (a plugin of the ``fedpanfm`` command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpanfm.certs import CertPaths, add_site_keys, init_certs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``certs`` subcommand.

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    certs = subparsers.add_parser("certs", help="make the federation's CA, server certificate and site keys")
    sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="new CA + coordinator TLS certificate + one auth key pair per site")
    init.add_argument("--out", required=True, type=Path, help="folder to write (ca.crt, server.*, sites/<name>/)")
    init.add_argument("--server-host", required=True,
                      help="name or IP the sites dial (goes into the certificate with localhost, 127.0.0.1)")
    init.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital_a,hospital_b")
    init.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every site kit)")
    init.set_defaults(func=_run_init)

    add = sub.add_parser("add-site", help="an auth key pair for one more site, under an existing CA")
    add.add_argument("--out", required=True, type=Path, help="the folder `certs init` wrote")
    add.add_argument("--site", required=True, help="the new site's name")
    add.add_argument("--force", action="store_true", help="replace the site's existing key pair")
    add.set_defaults(func=_run_add)


def _run_init(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    paths = init_certs(args.out, args.server_host, sites, days=args.days, force=args.force)
    print(f"CA:          {paths.ca_cert} (key {paths.ca_key}: keep it offline)")
    print(f"coordinator: {paths.server_cert}, {paths.server_key}")
    for s in sites:
        print(f"site {s}: give {paths.site_dir(s)}/ (auth.key, auth.pub, ca.crt) to that site only; "
              f"register {paths.site_public_key(s)} on the coordinator")
    return 0


def _run_add(args: argparse.Namespace) -> int:
    paths = CertPaths(args.out)
    priv, pub = add_site_keys(paths, args.site, force=args.force)
    print(f"site {args.site}: private key {priv} (to the site only), public key {pub} "
          "(add it to the coordinator config's sites and restart or run `fedpanfm server register`)")
    return 0
