"""Certificates and site keys for a deployed federation (``fedpanfm certs init``).

What Flower 1.41 expects, read from its source:

* TLS: the SuperLink serves one HTTPS port with ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``
  (PEM); SuperNodes and the ``flwr`` CLI verify it with ``--root-certificates`` / the
  connection's ``root-certificates`` (the CA, PEM). The server certificate's subjectAltName must
  hold the name sites dial.
* SuperNode authentication: an EC key on a NIST curve; the private key in OpenSSH format
  (``flower-supernode --auth-supernode-private-key``), the public key in OpenSSH format
  (``flwr supernode register``). We use P-384, the curve Flower's docs name.

Layout written under ``out``::

    ca.crt  ca.key                 the federation's CA (keep ca.key offline)
    server.crt  server.key         the coordinator's TLS certificate and key
    sites/<name>/auth.key          the site's private key (goes to that site only)
    sites/<name>/auth.pub          the site's public key (registered on the coordinator)
    sites/<name>/ca.crt            a copy of the CA certificate for the site kit

Private keys are written 0600. For institutions with their own PKI: any CA-signed server
certificate whose SAN holds the coordinator's name works; only the site key pairs must be
made with this command, ``certs add-site``, or ``ssh-keygen -t ecdsa -b 384`` (OpenSSH EC keys).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpanfm.site_names import check_site_name

_CURVE = ec.SECP384R1


class CertError(ValueError):
    """A certificate or key file is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class CertPaths:
    """Where ``init_certs`` put each file.

    Args:
        out: the folder everything is under.
    """

    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.out / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.out / "server.key"

    def site_dir(self, site: str) -> Path:
        return self.out / "sites" / site

    def site_private_key(self, site: str) -> Path:
        return self.site_dir(site) / "auth.key"

    def site_public_key(self, site: str) -> Path:
        return self.site_dir(site) / "auth.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with the final mode so a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(server_host: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([server_host, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_certs(out: str | Path, server_host: str, sites: list[str], days: int = 365,
               force: bool = False) -> CertPaths:
    """Make a CA, the coordinator's TLS certificate and one auth key pair per site.

    Args:
        out: the folder to write (created).
        server_host: the name or IP address sites use to reach the coordinator; it goes into
            the server certificate's subjectAltName together with ``localhost`` and ``127.0.0.1``.
        sites: site names (see :func:`check_site_name`).
        days: validity of the certificates.
        force: overwrite existing files; without it an existing ``ca.crt`` is an error (a new CA
            would silently invalidate every site kit already handed out).
    """
    if not server_host:
        raise ValueError("certs init: --server-host must not be empty")
    if not sites:
        raise ValueError("certs init: name at least one site (--sites a,b,c)")
    for s in sites:
        check_site_name(s)
    if len(set(sites)) != len(sites):
        raise ValueError(f"certs init: duplicate site names in {sites}")
    paths = CertPaths(Path(out))
    if paths.ca_cert.exists() and not force:
        raise FileExistsError(f"{paths.ca_cert} exists; pass --force to replace the whole CA "
                              "(every site then needs its kit again) or use `certs add-site`")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpanfm federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_host)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(server_host), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(paths.ca_cert, ca_pem, private=False)
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    for site in sites:
        add_site_keys(paths, site, force=force)
    return paths


def add_site_keys(paths: CertPaths, site: str, force: bool = False) -> tuple[Path, Path]:
    """Make one site's auth key pair (and copy the CA into its kit); returns (private, public).

    Args:
        paths: the certificate folder (its ``ca.crt`` must exist).
        site: the site name.
        force: replace an existing key pair (the old public key must then be unregistered).
    """
    check_site_name(site)
    if not paths.ca_cert.is_file():
        raise CertError(f"{paths.ca_cert}: no CA certificate; run `fedpanfm certs init` first")
    priv_path, pub_path = paths.site_private_key(site), paths.site_public_key(site)
    if priv_path.exists() and not force:
        raise FileExistsError(f"{priv_path} exists; pass --force to make a new key for site {site}")
    key = ec.generate_private_key(_CURVE())
    _write(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pub_path, pub + f" fedpanfm-site-{site}\n".encode(), private=False)
    _write(paths.site_dir(site) / "ca.crt", paths.ca_cert.read_bytes(), private=False)
    return priv_path, pub_path


# --------------------------------------------------------------------------- checks


def load_certificate(path: str | Path) -> x509.Certificate:
    """The first PEM certificate of ``path``; :class:`CertError` names the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CertError(f"{path}: certificate file not found")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


def load_auth_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A site's SuperNode auth key (OpenSSH EC private key), as ``flower-supernode`` reads it."""
    path = Path(path)
    if not path.is_file():
        raise CertError(f"{path}: private key file not found")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    if path.stat().st_mode & 0o077:
        raise CertError(f"{path}: private key is readable by others (mode {oct(path.stat().st_mode & 0o777)}); "
                        "run chmod 600 on it")
    return key


def load_auth_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A site's public key (OpenSSH format), as ``flwr supernode register`` reads it."""
    path = Path(path)
    if not path.is_file():
        raise CertError(f"{path}: public key file not found")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    return key


def split_address(address: str, where: str = "address") -> tuple[str, int]:
    """``"host:port"`` -> (host, port); IPv6 hosts in brackets (``[::1]:9092``).

    Args:
        address: the address.
        where: what to call it in the error (file and key).
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}: {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_tls(address: str, ca_cert: str | Path, timeout_s: float = 5.0) -> str:
    """Open a TLS connection to ``address`` trusting only ``ca_cert``; the server's subject.

    The certificate chain and the host name are both verified, as a SuperNode would.

    Args:
        address: ``host:port`` of the coordinator.
        ca_cert: the federation's CA certificate (PEM).
        timeout_s: connect + handshake timeout.

    Raises:
        ConnectionError: naming the address and what failed (unreachable, untrusted, wrong name).
    """
    host, port = split_address(address)
    load_certificate(ca_cert)
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionError(f"coordinator {address}: TLS certificate not trusted by {ca_cert}: "
                              f"{exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionError(f"coordinator {address}: cannot connect ({exc})") from None
    # getpeercert()'s "subject": relative distinguished names, each a tuple of (key, value) pairs
    # (ssl docs); typeshed types the dict's values as the union of every field's type.
    rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    subject = dict(rdn[0] for rdn in rdns)
    return str(subject.get("commonName", "?"))
