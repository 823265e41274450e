"""A local certificate authority for development and small federations (``secagg certs``).

A credential in secagg is a client certificate: its Common Name is the client id the holder may
submit as, and an Organizational Unit of ``secagg-admin`` lets it create rounds. The aggregator's
certificate carries the host names and addresses clients dial as Subject Alternative Names.

Keys are EC P-256, signatures SHA-256. Private keys are written unencrypted (gRPC reads them so),
with mode 0600 from the moment the file exists. Nothing is ever overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secagg.envelope import check_id
from secagg.errors import EnvelopeError, KeyFileError, SecAggError

ADMIN_OU = "secagg-admin"
CA_NAME = "ca"
CA_DAYS = 10 * 365
LEAF_DAYS = 825  # the longest lifetime common TLS clients accept for a server certificate
DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1")


@dataclasses.dataclass(frozen=True)
class CertPaths:
    """A certificate and its private key, as written to disk."""

    cert: Path
    key: Path


def init_ca(directory: str | os.PathLike) -> CertPaths:
    """Create a CA in ``directory``: ``ca.crt`` (give it to every party) and ``ca.key`` (0600; guard it).

    Whoever holds ``ca.key`` can issue a certificate for any client id or the admin role.
    """
    out = Path(directory)
    paths = CertPaths(out / f"{CA_NAME}.crt", out / f"{CA_NAME}.key")
    _refuse_existing(paths, "--dir")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secagg development CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(paths, cert, key)
    return paths


def issue(
    directory: str | os.PathLike,
    name: str,
    admin: bool = False,
    server: bool = False,
    hosts: tuple[str, ...] | list[str] = (),
) -> CertPaths:
    """Issue ``NAME.crt`` and ``NAME.key`` (0600) in ``directory``, signed by its CA.

    A client certificate's Common Name is ``name``, the only client id it may submit as; ``admin``
    adds the role that may create rounds. With ``server``, the certificate is the aggregator's:
    Common Name the first host, and every host (default localhost and 127.0.0.1) as a SAN.
    """
    try:
        check_id("client", name)
    except EnvelopeError:
        raise SecAggError(f"--name {name!r}: use 1-64 characters from letters, digits, '.', '_' and '-', starting "
                          "with a letter or digit (a client's name is the client id it submits as)") from None
    if name == CA_NAME:
        raise SecAggError(f"--name {CA_NAME!r} is the CA's own file name; pick another name")
    if hosts and not server:
        raise SecAggError("--host is for the aggregator's certificate; add --server")
    if server and admin:
        raise SecAggError("--admin is a client role; issue the aggregator's certificate without it")
    out = Path(directory)
    ca_cert, ca_key = _load_ca(out)
    paths = CertPaths(out / f"{name}.crt", out / f"{name}.key")
    _refuse_existing(paths, "--name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder().issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if server:
        hosts = tuple(hosts) or DEFAULT_SERVER_HOSTS
        builder = (
            builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
    else:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if admin:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU))
        builder = (
            builder.subject_name(x509.Name(attributes))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
    _write(paths, builder.sign(ca_key, hashes.SHA256()), key)
    return paths


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:[]" for c in host):
        raise SecAggError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / f"{CA_NAME}.crt", directory / f"{CA_NAME}.key"
    if not (cert_path.exists() and key_path.exists()):
        raise KeyFileError(f"no CA in {directory} ({CA_NAME}.crt and {CA_NAME}.key); "
                           f"run 'secagg certs init --dir {directory}' first")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"the CA in {directory} cannot be read ({exc}); recreate it with 'secagg certs init'") from None
    if key.public_key() != cert.public_key():
        raise KeyFileError(f"{key_path} is not the key of {cert_path}; the CA files were mixed up")
    return cert, key


def _refuse_existing(paths: CertPaths, option: str) -> None:
    for p in (paths.cert, paths.key):
        if p.exists():
            raise KeyFileError(f"{p} already exists; pick another {option} or delete the old files first")


def _write(paths: CertPaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # The key first, created 0600 so the secret is never readable by others, even briefly; O_EXCL so
    # that a file that appeared since the check is not overwritten.
    _create(paths.key, key_pem, 0o600)
    try:
        _create(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        paths.key.unlink(missing_ok=True)
        raise


def _create(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; delete it first or pick another name") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask may have narrowed the mode of the certificate
