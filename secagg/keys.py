"""CKKS keys of a federation: creating, saving and loading them.

A federation has one secret key, shared by its clients (``client.key``) and never given to the
aggregator. The aggregator holds ``server.key``: the encryption parameters and the key id, and
nothing that can decrypt. Adding ciphertexts needs no key at all, so the aggregator gets no public,
relinearization or Galois key either, and it needs no SEAL: it adds the first polynomials of the
clients' ciphertexts modulo the data prime with numpy (``secagg.polys``). Only clients load TenSEAL.

Parameters (addition only, no multiplicative depth): ring dimension N = 8192, coefficient modulus
two 60-bit primes (one data prime plus SEAL's special prime, 120 bits in all, below the 218 bits
that SEAL's HomomorphicEncryption.org tables allow for 128-bit classical security at N = 8192),
scale 2^40. Values and every partial sum must stay below 2^19 in magnitude; see
``secagg.ciphertexts`` for how that bound is enforced.

Key file layout (both kinds): 8-byte magic ``SECAGGK1``, 4-byte big-endian header length, a JSON
header (``kind``, ``key_id``, parameters, blob lengths), then the SEAL blobs it lists. ``server.key``
(format 2) holds no blob at all: its parameters are in the header, so the aggregator reads it
without SEAL. Format-1 server keys (a SEAL parameter blob) are still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from secagg.errors import KeyFileError

MAGIC = b"SECAGGK1"
POLY_MODULUS_DEGREE = 8192
COEFF_MODULUS_BITS = (60, 60)
SCALE_BITS = 40
SECURITY_BITS = 128
#: The data prime SEAL's CoeffModulus.Create(8192, [60, 60]) picks (deterministic; checked at keygen).
DATA_PRIME = 1152921504606748673


@dataclasses.dataclass(frozen=True)
class KeyPaths:
    """Where :func:`keygen` wrote the two key files."""

    client: Path
    server: Path


@dataclasses.dataclass(frozen=True)
class Parameters:
    """The public parameters everyone agrees on; plain numbers, no SEAL objects."""

    poly_modulus_degree: int = POLY_MODULUS_DEGREE
    data_prime: int = DATA_PRIME
    scale_bits: int = SCALE_BITS

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


class _SealParameters:
    """SEAL objects built from the fixed parameters (clients only: needs TenSEAL)."""

    def __init__(self, params_blob: bytes | None = None) -> None:
        seal = _seal()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        if params_blob is None:
            parms.set_poly_modulus_degree(POLY_MODULUS_DEGREE)
            parms.set_coeff_modulus(seal.CoeffModulus.Create(POLY_MODULUS_DEGREE, list(COEFF_MODULUS_BITS)))
        else:
            _load_from_bytes(parms, params_blob)
        self.parms = parms
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise KeyFileError(f"invalid CKKS parameters: {self.context.parameters_error_message()}")
        self.scale = float(2**SCALE_BITS)
        self.slots = POLY_MODULUS_DEGREE // 2
        q = self.context.first_context_data().parms().coeff_modulus()
        if len(q) != 1 or q[0].value() != DATA_PRIME:
            raise KeyFileError("the key's CKKS parameters are not secagg's (one 60-bit data prime at N = 8192); "
                               "run 'secagg keygen' again")

    def blob(self) -> bytes:
        return _save_to_bytes(self.parms)


class ServerKey:
    """What the aggregator may hold: parameters and key id, no secret key. Needs no SEAL."""

    kind = "server"

    def __init__(self, key_id: str, parameters: Parameters | None = None) -> None:
        self.key_id = key_id
        self.parameters = parameters or Parameters()


class ClientKey(ServerKey):
    """The federation's secret key. Only clients hold it; it encrypts and decrypts (with TenSEAL)."""

    kind = "client"

    def __init__(self, key_id: str, params: _SealParameters, secret_key, secret_blob: bytes) -> None:
        super().__init__(key_id, Parameters())
        self.params = params
        self.secret_key = secret_key
        # The serialized secret: the input of every key this client derives (tags, integrity checks).
        self._secret_blob = secret_blob

    @property
    def context(self):
        return self.params.context

    def derive(self, label: str, length: int = 32) -> bytes:
        """A key for one purpose (``label``), derived from the secret with HKDF-SHA256; the aggregator cannot."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=length, salt=self.key_id.encode(),
                    info=b"secagg/" + label.encode()).derive(self._secret_blob)

    def server_key(self) -> ServerKey:
        """The aggregator's view of this key: same id and parameters, no secret."""
        return ServerKey(self.key_id, self.parameters)


def _seal():
    try:
        import tenseal.sealapi as seal
    except ImportError as e:
        raise KeyFileError("client keys need TenSEAL (encryption runs at the sites): pip install 'secagg[client]'; "
                           "the aggregator itself needs neither TenSEAL nor a client key") from e
    return seal


def keygen(out_dir: str | os.PathLike) -> KeyPaths:
    """Create a new federation key pair in ``out_dir``: ``client.key`` (0600) and ``server.key``.

    Refuses to overwrite existing key files, since that would orphan every round under the old key.
    """
    seal = _seal()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = KeyPaths(client=out / "client.key", server=out / "server.key")
    for p in (paths.client, paths.server):
        if p.exists():
            raise KeyFileError(f"{p} already exists; choose an empty --out directory or delete the old keys first")
    params = _SealParameters()
    secret = seal.KeyGenerator(params.context).secret_key()
    params_blob = params.blob()
    secret_blob = _save_to_bytes(secret)
    key_id = _derive_key_id(params_blob, secret_blob)
    _write_key_file(paths.client, "client", key_id, {"params": params_blob, "secret_key": secret_blob}, mode=0o600)
    _write_key_file(paths.server, "server", key_id, {}, mode=0o644)
    return paths


def load_client_key(path: str | os.PathLike) -> ClientKey:
    """Load ``client.key``; raises :class:`KeyFileError` if it is a server key or damaged."""
    header, blobs = _read_key_file(Path(path))
    if header["kind"] != "client":
        raise KeyFileError(f"{path} is a {header['kind']} key; clients need the client.key written by 'secagg keygen'")
    params = _SealParameters(blobs["params"])
    if _derive_key_id(blobs["params"], blobs["secret_key"]) != header["key_id"]:
        raise KeyFileError(f"{path}: key id does not match the secret key inside; the file was altered or mixed up")
    secret = _seal().SecretKey()
    _load_from_bytes(secret, blobs["secret_key"], params.context)
    return ClientKey(header["key_id"], params, secret, blobs["secret_key"])


def load_server_key(path: str | os.PathLike) -> ServerKey:
    """Load the aggregator's key (no SEAL needed). A client key is refused: the aggregator must never hold the secret."""
    header, _ = _read_key_file(Path(path))
    if header["kind"] != "server":
        raise KeyFileError(
            f"{path} is a {header['kind']} key and contains the secret key; give the aggregator server.key instead"
        )
    try:
        key_id = header["key_id"]
        if not isinstance(key_id, str) or not key_id:
            raise ValueError("key_id is not a string")
        parameters = Parameters(int(header.get("poly_modulus_degree", POLY_MODULUS_DEGREE)),
                                int(header.get("data_prime", DATA_PRIME)), int(header.get("scale_bits", SCALE_BITS)))
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{path} is damaged ({exc}); restore it from backup or run 'secagg keygen' again") from None
    if parameters != Parameters():
        raise KeyFileError(f"{path}: parameters {parameters} are not this version's; run 'secagg keygen' again")
    return ServerKey(key_id, parameters)


def load_key(path: str | os.PathLike) -> ServerKey:
    """Load either kind of key file (a :class:`ClientKey` for client.key)."""
    header, _ = _read_key_file(Path(path))
    return load_client_key(path) if header["kind"] == "client" else load_server_key(path)


def _derive_key_id(params_blob: bytes, secret_blob: bytes) -> str:
    # A hash of the fresh secret key: unique per keygen (the secret is random) and checkable on load.
    # Only 128 bits of a one-way hash are published; they reveal nothing usable about the key.
    return hashlib.sha256(b"secagg-key-id\0" + params_blob + secret_blob).hexdigest()[:32]


def _write_key_file(path: Path, kind: str, key_id: str, blobs: dict[str, bytes], mode: int) -> None:
    header = {
        "kind": kind,
        "key_id": key_id,
        "format": 2,
        "scheme": "CKKS",
        "poly_modulus_degree": POLY_MODULUS_DEGREE,
        "coeff_modulus_bits": list(COEFF_MODULUS_BITS),
        "scale_bits": SCALE_BITS,
        "security_bits": SECURITY_BITS,
        "data_prime": DATA_PRIME,
        "blobs": [[name, len(data)] for name, data in blobs.items()],
    }
    head = json.dumps(header, sort_keys=True).encode()
    # Create with the final mode so the secret is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(MAGIC + struct.pack(">I", len(head)) + head)
        for data in blobs.values():
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def _read_key_file(path: Path) -> tuple[dict, dict[str, bytes]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}; pass the path written by 'secagg keygen'") from exc
    if not data.startswith(MAGIC) or len(data) < 12:
        raise KeyFileError(f"{path} is not a secagg key file; pass the client.key or server.key written by 'secagg keygen'")
    (head_len,) = struct.unpack(">I", data[8:12])
    try:
        header = json.loads(data[12 : 12 + head_len])
        blobs: dict[str, bytes] = {}
        pos = 12 + head_len
        for name, size in header["blobs"]:
            blobs[name] = data[pos : pos + size]
            if len(blobs[name]) != size:
                raise ValueError("truncated")
            pos += size
        kind = header["kind"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is damaged or truncated; restore it from backup or run 'secagg keygen' again") from exc
    if kind not in ("client", "server") or (kind == "client" and ("secret_key" not in blobs or "params" not in blobs)):
        raise KeyFileError(f"{path} is damaged: unexpected contents; restore it or run 'secagg keygen' again")
    return header, blobs


def _scratch_dir() -> str:
    # SEAL's Python binding saves and loads only through file paths; tmpfs keeps that off the disk.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _save_to_bytes(obj) -> bytes:
    fd, name = tempfile.mkstemp(dir=_scratch_dir(), prefix="secagg-")
    os.close(fd)
    try:
        obj.save(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def _load_from_bytes(obj, data: bytes, context=None) -> None:
    fd, name = tempfile.mkstemp(dir=_scratch_dir(), prefix="secagg-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            obj.load(name) if context is None else obj.load(context, name)
        except Exception as exc:  # SEAL raises ValueError/RuntimeError/IOError variously
            raise KeyFileError(f"key material could not be loaded ({exc}); the key file is damaged") from exc
    finally:
        os.unlink(name)
