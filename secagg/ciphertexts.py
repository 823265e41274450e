"""Clients' side of the encryption: slot vectors <-> seeded CKKS ciphertexts (c0, seed), with SEAL.

Each ciphertext carries 8,192 reals, two per complex slot (4,096 slots at N = 8192), encrypted with
the secret key in SEAL's *seeded* symmetric form: the second polynomial c1 is replaced by the
64-byte seed that generates it. A client sends the first polynomial c0 and the seed
(:mod:`secagg.polys`, 8.0 bytes per real); the aggregator adds the c0s and keeps the seeds.

To decrypt a sum, a client rebuilds c1 itself: every contributor's seed, loaded by SEAL as a seeded
ciphertext with a zero c0, expands to (0, c1_i); their sum plus (c0_sum, 0) is the ciphertext of the
sum, which it decrypts. The aggregator therefore cannot touch c1 (no key recovery by perturbing
it) and cannot invent, repeat or drop contributions without the count slots noticing
(:mod:`secagg.slots`).

SEAL's Python binding reads and writes ciphertexts only through file paths: a per-process,
per-thread scratch file on tmpfs, recreated after ``fork`` (two processes never share one).
SEAL compresses a saved ciphertext with zstd; clients decompress it to read c0 and the seed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from secagg.errors import CiphertextError, KeyFileError
from secagg.keys import ClientKey, _scratch_dir
from secagg.polys import SEED_BYTES

REALS_PER_CIPHERTEXT = 8192
_SEAL_HEADER = 16
_META = 73  # parms_id 32 | is_ntt 1 | size 8 | N 8 | coeff_mod_size 8 | scale 8 | correction 8
_C0_START = _META + 16 + 8  # then a DynArray: its own 16-byte header, a uint64 count, the words


def _seal():
    try:
        import tenseal.sealapi as seal
    except ImportError as e:
        raise KeyFileError("encrypting and decrypting need TenSEAL: pip install 'secagg[client]'") from e
    return seal


def _zstd():
    try:
        import zstandard
    except ImportError as e:
        raise KeyFileError("encrypting needs the zstandard package: pip install 'secagg[client]'") from e
    return zstandard


class _Scratch:
    """A per-process, per-thread tmpfs file for SEAL's path-only I/O; never shared across a fork."""

    _local = threading.local()

    @classmethod
    def path(cls) -> str:
        pid = os.getpid()
        if getattr(cls._local, "pid", None) != pid:  # a forked child inherits the parent's thread-locals
            cls._local.pid = pid
            cls._local.path = os.path.join(_scratch_dir(), f"secagg-{pid}-{threading.get_ident()}-"
                                           f"{os.urandom(4).hex()}.ct")
        return cls._local.path


class SealCodec:
    """SEAL objects of one client key, and the byte layout of its seeded ciphertexts."""

    def __init__(self, key: ClientKey) -> None:
        seal = _seal()
        self.key = key
        ctx = key.context
        self.n = key.parameters.poly_modulus_degree
        self.encoder = seal.CKKSEncoder(ctx)
        self.encryptor = seal.Encryptor(ctx, key.secret_key)
        self.decryptor = seal.Decryptor(ctx, key.secret_key)
        self.evaluator = seal.Evaluator(ctx)
        self._dctx = _zstd().ZstdDecompressor()
        # Learn SEAL's exact layout from one ciphertext: everything but c0 and the seed is the same
        # for every ciphertext of these parameters.
        body = self._body(self._encrypt_plaintext(np.zeros(REALS_PER_CIPHERTEXT)))
        c0_end = _C0_START + self.n * 8
        if len(body) != c0_end + 16 + 1 + SEED_BYTES or int.from_bytes(body[_C0_START - 8:_C0_START], "little") != self.n:
            raise CiphertextError("this TenSEAL/SEAL version lays out seeded ciphertexts differently than secagg "
                                  "expects; install the tenseal version pinned in secagg's requirements")
        self._prefix = bytes(body[:_C0_START])
        self._seed_prefix = bytes(body[c0_end:c0_end + 17])

    def _encrypt_plaintext(self, reals: np.ndarray):
        seal = _seal()
        pt = seal.Plaintext()
        self.encoder.encode((reals[0::2] + 1j * reals[1::2]).tolist(), self.key.params.scale, pt)
        return self.encryptor.encrypt_symmetric(pt)

    def _body(self, serializable) -> bytes:
        scratch = _Scratch.path()
        try:
            serializable.save(scratch)
            blob = Path(scratch).read_bytes()
        finally:
            _unlink(scratch)
        if blob[5] == 0:
            return blob[_SEAL_HEADER:]
        return self._dctx.decompress(blob[_SEAL_HEADER:], max_output_size=4 * self.n * 8 + 4096)

    def encrypt(self, reals: np.ndarray) -> tuple[bytes, bytes]:
        """(c0 as N little-endian uint64 words, the 64-byte seed of c1) of 8,192 reals."""
        body = self._body(self._encrypt_plaintext(reals))
        c0_end = _C0_START + self.n * 8
        return bytes(body[_C0_START:c0_end]), bytes(body[c0_end + 17:c0_end + 17 + SEED_BYTES])

    def _seeded_blob(self, c0: bytes, seed: bytes) -> bytes:
        body = self._prefix + c0 + self._seed_prefix + seed
        header = bytearray(b"\x5e\xa1\x10\x04\x03\x00\x00\x00")  # SEAL magic, version 4.1, no compression
        return bytes(header) + (len(body) + _SEAL_HEADER).to_bytes(8, "little") + body

    def _load(self, c0: bytes, seed: bytes):
        seal = _seal()
        scratch = _Scratch.path()
        try:
            with open(scratch, "wb") as f:
                f.write(self._seeded_blob(c0, seed))
            ct = seal.Ciphertext()
            try:
                ct.load(self.key.context, scratch)
            except Exception as exc:  # SEAL signals bad data with several exception types
                raise CiphertextError(f"a ciphertext could not be rebuilt from its seed ({exc})") from exc
        finally:
            _unlink(scratch)
        return ct

    def decrypt(self, c0_sum: bytes, seeds: Sequence[bytes]) -> np.ndarray:
        """The 8,192 reals of the ciphertext (c0_sum, sum of PRG(seed) over ``seeds``)."""
        if not seeds:
            raise CiphertextError("a sum without contributions cannot be decrypted")
        zero = bytes(self.n * 8)
        ct = self._load(c0_sum, seeds[0])
        for seed in seeds[1:]:
            self.evaluator.add_inplace(ct, self._load(zero, seed))
        seal = _seal()
        pt = seal.Plaintext()
        self.decryptor.decrypt(ct, pt)
        z = np.asarray(self.encoder.decode_complex(pt), dtype=np.complex128)
        out = np.empty(REALS_PER_CIPHERTEXT)
        out[0::2] = z.real
        out[1::2] = z.imag
        return out


_codecs: dict[tuple[int, int, str], SealCodec] = {}


def codec(key: ClientKey) -> SealCodec:
    """The :class:`SealCodec` of ``key`` for this process and thread (SEAL objects are not shared across them)."""
    k = (os.getpid(), threading.get_ident(), key.key_id)
    c = _codecs.get(k)
    if c is None or c.key is not key:
        c = _codecs[k] = SealCodec(key)
    return c


def encrypt(key: ClientKey, reals: np.ndarray, progress: Callable[[str, int, int], None] | None = None
            ) -> list[tuple[bytes, bytes]]:
    """Seeded ciphertexts of ``reals`` (a whole number of 8,192-real blocks): [(c0, seed)] per block."""
    n = len(reals) // REALS_PER_CIPHERTEXT
    if n * REALS_PER_CIPHERTEXT != len(reals):
        raise ValueError("encrypt takes whole 8,192-real blocks")
    c = codec(key)
    out = []
    for i in range(n):
        out.append(c.encrypt(reals[i * REALS_PER_CIPHERTEXT:(i + 1) * REALS_PER_CIPHERTEXT]))
        if progress:
            progress("encrypt", i + 1, n)
    return out


def decrypt(key: ClientKey, c0_sums: Sequence[bytes], seeds: Sequence[Sequence[bytes]],
            progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """The reals of the summed ciphertexts: ``seeds[i]`` are the contributors' seeds of ciphertext ``i``."""
    c = codec(key)
    out = np.empty(len(c0_sums) * REALS_PER_CIPHERTEXT)
    for i, (c0, ct_seeds) in enumerate(zip(c0_sums, seeds)):
        out[i * REALS_PER_CIPHERTEXT:(i + 1) * REALS_PER_CIPHERTEXT] = c.decrypt(c0, ct_seeds)
        if progress:
            progress("decrypt", i + 1, len(c0_sums))
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
