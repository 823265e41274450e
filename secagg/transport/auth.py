"""Who is calling: the identity in the client certificate that mutual TLS verified.

With mutual TLS the handshake already proved that the caller holds the private key of a
certificate issued by the federation's CA; this module only reads what the certificate says:
its Common Name is the one client id the caller may submit as, and an Organizational Unit of
``secagg-admin`` lets it create and cancel rounds. Without mutual TLS nothing is enforced (see ``Authorizer``).
"""

from __future__ import annotations

import dataclasses
import functools

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from secagg.certs import ADMIN_OU
from secagg.errors import AuthError, UnauthenticatedError


@dataclasses.dataclass(frozen=True)
class Identity:
    """A verified caller: its client id (the certificate's Common Name) and whether it is an admin."""

    name: str
    is_admin: bool


class Authorizer:
    """Checks each call against the caller's certificate.

    ``enforce`` is True when the server runs mutual TLS. When it is False (plain or TLS-only) every
    check passes: TLS alone protects the channel, not who submits.
    """

    def __init__(self, enforce: bool) -> None:
        self.enforce = enforce

    def caller(self, context: grpc.ServicerContext) -> Identity | None:
        """The verified caller, or None if credentials are not enforced; raises if it has none."""
        if not self.enforce:
            return None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise UnauthenticatedError("this aggregator requires a client certificate: give --tls-ca, --tls-cert and "
                                       "--tls-key (issued by 'secagg certs issue')")
        return _identity(pems[0])

    def check_admin(self, context: grpc.ServicerContext, action: str) -> Identity | None:
        """Only an admin certificate may ``action`` (e.g. "create rounds"); returns the caller (None: not enforced)."""
        who = self.caller(context)
        if who is not None and not who.is_admin:
            raise AuthError(f"certificate {who.name!r} may not {action}: that needs an admin certificate "
                            "('secagg certs issue --admin')")
        return who

    def check_submitter(self, context: grpc.ServicerContext, client_id: str) -> None:
        """A client may submit only as the client id its certificate names."""
        who = self.caller(context)
        if who is not None and who.name != client_id:
            raise AuthError(f"certificate is for {who.name!r} but the update claims client {client_id!r}; "
                            f"submit with --client-id {who.name} or use {client_id}'s own certificate")


@functools.lru_cache(maxsize=256)
def _identity(pem: bytes) -> Identity:
    try:
        subject = x509.load_pem_x509_certificate(pem).subject
    except ValueError:
        raise UnauthenticatedError("the client certificate cannot be parsed; issue a new one") from None
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise UnauthenticatedError("the client certificate must name exactly one client (one Common Name); "
                                   "issue it with 'secagg certs issue --name CLIENT_ID'")
    units = {a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)}
    return Identity(names[0].value, ADMIN_OU in units)
