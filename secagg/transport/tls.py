"""TLS settings of the aggregator and its clients, and the gRPC credentials built from them.

``ServerTLS(cert, key)`` encrypts and authenticates the channel: clients know they talk to the
aggregator, but the aggregator does not know who they are. ``ServerTLS(cert, key, ca)`` is mutual
TLS: every client must present a certificate issued by ``ca``, and the aggregator enforces what it
may do (see ``secagg.transport.auth``). Files are read and checked when the credentials are built,
so that a wrong path or a mixed-up key fails with a message instead of a failed handshake.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secagg.errors import KeyFileError

ENV_CA, ENV_CERT, ENV_KEY = "SECAGG_TLS_CA", "SECAGG_TLS_CERT", "SECAGG_TLS_KEY"


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """The aggregator's certificate and key; with ``ca``, client certificates are required (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def __post_init__(self) -> None:
        _paths(self)

    @property
    def mutual(self) -> bool:
        """True if clients must present a certificate, so that credentials are enforced."""
        return self.ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; raises :class:`KeyFileError` naming the option to fix."""
        cert, key = _cert_and_key(self.cert, "--tls-cert", self.key, "--tls-key")
        ca = _ca(self.ca, "--tls-ca") if self.ca is not None else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """The CA that issued the aggregator's certificate, and this client's own certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        _paths(self)
        if (self.cert is None) != (self.key is None):
            raise KeyFileError("--tls-cert and --tls-key go together: give both (or neither, for TLS without a "
                               "client certificate)")

    @classmethod
    def from_env(cls) -> "ClientTLS | None":
        """From ``SECAGG_TLS_CA``, ``SECAGG_TLS_CERT``, ``SECAGG_TLS_KEY``; None if none of them is set."""
        ca, cert, key = (os.environ.get(v) or None for v in (ENV_CA, ENV_CERT, ENV_KEY))
        if ca is None and cert is None and key is None:
            return None
        if ca is None:
            raise KeyFileError(f"{ENV_CERT}/{ENV_KEY} are set but {ENV_CA} is not: set it to the federation's ca.crt")
        return cls(ca, cert, key)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials; raises :class:`KeyFileError` naming the option to fix."""
        ca = _ca(self.ca, f"--tls-ca ({ENV_CA})")
        if self.cert is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        cert, key = _cert_and_key(self.cert, f"--tls-cert ({ENV_CERT})", self.key, f"--tls-key ({ENV_KEY})")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _paths(settings) -> None:
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is not None:
            object.__setattr__(settings, field.name, Path(value))


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{option}: {path} does not exist; create certificates with 'secagg certs'") from None
    except OSError as exc:
        raise KeyFileError(f"{option}: cannot read {path} ({exc.strerror or exc})") from None


def _certificates(path: Path, option: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(path, option)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise KeyFileError(f"{option}: {path} is not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for c in certs:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise KeyFileError(f"{option}: {path} is valid only from {c.not_valid_before_utc:%Y-%m-%d} to "
                               f"{c.not_valid_after_utc:%Y-%m-%d}; issue a new one")
    return data, certs


def _ca(path: Path, option: str) -> bytes:
    return _certificates(path, option)[0]


def _cert_and_key(cert_path: Path, cert_option: str, key_path: Path, key_option: str) -> tuple[bytes, bytes]:
    cert_pem, certs = _certificates(cert_path, cert_option)
    key_pem = _read(key_path, key_option)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # The exception text is not echoed: it could quote part of the file.
        raise KeyFileError(f"{key_option}: {key_path} is not an unencrypted PEM private key") from None
    if key.public_key() != certs[0].public_key():
        raise KeyFileError(f"{key_option}: {key_path} is not the private key of {cert_path} ({cert_option}); "
                           "give the .key written next to that .crt")
    return cert_pem, key_pem


def handshake_hint(detail: str, tls: ClientTLS | None, server: str) -> str:
    """What to fix when a connection failed in the TLS handshake; "" if ``detail`` is not about TLS.

    gRPC reports a failed handshake as UNAVAILABLE with the TLS library's text; these are its words.
    """
    host = server.rsplit(":", 1)[0].strip("[]")
    if "WRONG_VERSION_NUMBER" in detail and tls is not None:
        return ("the aggregator does not speak TLS; leave out --tls-ca, --tls-cert and --tls-key "
                f"(and unset {ENV_CA}, {ENV_CERT}, {ENV_KEY}) or start it with --tls-cert and --tls-key")
    if "CERTIFICATE_VERIFY_FAILED" in detail and tls is not None:
        return f"the aggregator's certificate was not issued by --tls-ca {tls.ca}; give the federation's ca.crt"
    if "Hostname Verification" in detail:
        return (f"the aggregator's certificate does not name {host!r}; connect with a name it lists, or issue it "
                f"with 'secagg certs issue --server --host {host}'")
    if "Socket closed" in detail or "Connection reset" in detail:
        if tls is None:
            return ("the aggregator closed the connection; if it uses TLS, give --tls-ca (and --tls-cert, --tls-key "
                    "if it requires client certificates)")
        if tls.cert is None:
            return ("the aggregator closed the connection; if it requires client certificates, give --tls-cert and "
                    "--tls-key issued by the federation's CA")
        return (f"the aggregator closed the connection; if it refused the client certificate {tls.cert}, check "
                "that it was issued by the aggregator's --tls-ca")
    return ""
