"""Certificates and site keys (fedpanfm/certs.py): formats Flower reads, permissions, TLS check."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpanfm.certs import (
    CertError,
    CertPaths,
    add_site_keys,
    check_tls,
    init_certs,
    load_auth_private_key,
    load_auth_public_key,
    load_certificate,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("certs"), "coord.example.org", ["a", "b_2"])


def test_files_and_permissions(certs: CertPaths) -> None:
    for private in (certs.ca_key, certs.server_key, certs.site_private_key("a"), certs.site_private_key("b_2")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for public in (certs.ca_cert, certs.server_cert, certs.site_public_key("a"), certs.site_dir("a") / "ca.crt"):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public
    assert (certs.site_dir("a") / "ca.crt").read_bytes() == certs.ca_cert.read_bytes()


def test_server_certificate_signed_by_ca_with_san(certs: CertPaths) -> None:
    ca, server = load_certificate(certs.ca_cert), load_certificate(certs.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_site_keys_are_what_flower_reads(certs: CertPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    priv = load_auth_private_key(certs.site_private_key("a"))
    pub = load_auth_public_key(certs.site_public_key("a"))
    assert isinstance(priv.curve, ec.SECP384R1)
    # The pair matches, and Flower's own loader (flwr supernode register) accepts the public key.
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert try_load_public_key(certs.site_public_key("a")) == public_key_to_bytes(pub)
    # flower-supernode reads the private key with load_ssh_private_key.
    raw = serialization.load_ssh_private_key(certs.site_private_key("a").read_bytes(), None)
    assert isinstance(raw, ec.EllipticCurvePrivateKey)
    other = load_auth_public_key(certs.site_public_key("b_2"))
    assert other.public_numbers() != pub.public_numbers()


def test_refuses_to_overwrite_and_bad_names(tmp_path: Path, certs: CertPaths) -> None:
    with pytest.raises(FileExistsError, match="--force"):
        init_certs(certs.out, "x", ["a"])
    with pytest.raises(ValueError, match="not a valid site name"):
        init_certs(tmp_path / "c", "x", ["ok", "bad/name"])
    with pytest.raises(ValueError, match="duplicate"):
        init_certs(tmp_path / "d", "x", ["a", "a"])
    with pytest.raises(FileExistsError, match="site a"):
        add_site_keys(certs, "a")
    priv, pub = add_site_keys(certs, "late_joiner")
    assert load_auth_public_key(pub).public_numbers() == load_auth_private_key(priv).public_key().public_numbers()


def test_bad_files_name_the_file(tmp_path: Path, certs: CertPaths) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(certs.site_private_key("a").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(CertError, match="loose.key.*readable by others"):
        load_auth_private_key(loose)
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    with pytest.raises(CertError, match="junk.pub"):
        load_auth_public_key(junk)
    with pytest.raises(CertError, match="missing.crt: certificate file not found"):
        load_certificate(tmp_path / "missing.crt")


def _tls_server(certs: CertPaths) -> tuple[socket.socket, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the untrusting client aborts the handshake

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_check_tls_trusts_only_the_federation_ca(tmp_path: Path, certs: CertPaths) -> None:
    other = init_certs(tmp_path / "other", "coord.example.org", ["a"])
    srv, t = _tls_server(certs)
    try:
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        assert check_tls(addr, certs.ca_cert, timeout_s=5) == "coord.example.org"
        with pytest.raises(ConnectionError, match="not trusted"):
            check_tls(addr, other.ca_cert, timeout_s=5)
    finally:
        srv.close()
        t.join(timeout=10)
    with pytest.raises(ConnectionError, match="cannot connect"):
        check_tls(addr, certs.ca_cert, timeout_s=2)
