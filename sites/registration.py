"""Is this site's key registered with the coordinator? A signed challenge, as the SuperNode makes it.

``fedpanfm site check`` must not call a site ready whose key the coordinator never registered:
a TLS handshake proves only that the coordinator is reachable and trusted. Flower 1.41's
SuperNode joins by ``ActivateNode`` over the Fleet API, its request signed with the site's
private key (a timestamp signed with ECDSA; flwr/supernode/node_auth_http_interceptor.py). The
SuperLink verifies the signature and activates the node only if that public key was
registered (``flwr supernode register``). We make the same signed call with Flower's own
client and interceptors, and ``DeactivateNode`` at once, so the node is left offline as it was.

The SuperLink answers one error for "key not registered" and "a SuperNode with this key is
online already" (code 2004, "Failed to activate SuperNode"); both are reported, as the check
is meant to run before ``site start``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedpanfm.certs import load_auth_private_key


class RegistrationError(ConnectionError):
    """The coordinator did not accept the site's signed request; the message says why."""


def probe_registration(address: str, ca_cert: str | Path, auth_key: str | Path, timeout_s: float = 10.0) -> int:
    """Activate and at once deactivate this site's node at the coordinator; its node id.

    Args:
        address: ``host:port`` of the coordinator's SuperLink.
        ca_cert: the federation's CA certificate.
        auth_key: the site's private auth key (OpenSSH EC).
        timeout_s: per request.

    Raises:
        RegistrationError: the key is not registered (or a SuperNode with it is online), the
            signature was refused, or the coordinator did not answer.
    """
    import httpx
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import FlowerError
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    private = load_auth_private_key(auth_key)
    public = private.public_key()
    # What FleetHttpClient.from_server_address builds for TLS with a CA file, plus a timeout.
    client = FleetHttpClient(
        f"https://{address}", verify=str(Path(ca_cert).resolve()), timeout=timeout_s,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"), NodeAuthHttpInterceptor(private, public)])
    with client:
        try:
            reply = client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(public),
                                                            heartbeat_interval=HEARTBEAT_MIN_INTERVAL))
        except httpx.HTTPStatusError as exc:
            err = FlowerError.from_json(exc.response.text)
            detail = f"[code {err.code}] {err.message}" if err else f"HTTP {exc.response.status_code}"
            if exc.response.status_code == httpx.codes.UNAUTHORIZED:
                raise RegistrationError(
                    f"{address} refused the signed request ({detail}): the site's clock may be off by more "
                    "than a minute, or the key file is damaged") from None
            raise RegistrationError(
                f"{address} refused the site's key {auth_key} ({detail}): it is not registered there (the "
                "coordinator adds the site's auth.pub to `sites` and runs `fedpanfm server register`), or a "
                "SuperNode with this key is already online") from None
        except httpx.HTTPError as exc:
            raise RegistrationError(f"{address}: no answer to the signed request ({type(exc).__name__}: {exc})") from None
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=reply.node_id))
        except httpx.HTTPError:
            pass  # it goes offline by itself after its (shortest) heartbeat interval
    return int(reply.node_id)
