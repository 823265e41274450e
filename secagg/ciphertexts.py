"""Flat vectors <-> compact CKKS ciphertexts, and the aggregator's running encrypted sum.

Layout on the wire (8.02 bytes per parameter): each ciphertext carries 8192 reals, two per complex
slot (4096 slots at N = 8192), encrypted with the secret key in SEAL's *seeded* symmetric form,
where the second polynomial is replaced by the seed that generates it. The aggregator expands the
seed when it loads the ciphertext; the sum it returns is an ordinary ciphertext (16 B/param).

What is encrypted is not the raw model but ``[w*theta, w, 1]``: the weighted parameters, the
weight, and a count. The aggregator adds these; the client divides the first part by the summed
weight and checks that the count equals the number of accepted submissions, which exposes a wrong
key or corrupted sum instead of writing garbage.

Overflow: CKKS wraps silently once a sum leaves (-2^19, 2^19) at scale 2^40 with a 60-bit prime.
A round fixes its expected number of clients N, a maximum weight W_max and a bound B on |theta|.
Each client encodes w = c * W / W_max with c = LIMIT / (N * B), so every slot of every partial
sum stays below LIMIT = 2^18 (half the hard bound, for CKKS noise), and the weight uses as much
of the range as possible. The 60-bit prime fixes the total dynamic range, so the error of the
average depends only on N * B * W_max / W: CKKS adds about 1e-9 absolute to each summed slot,
which becomes about 1e-9 * B * W_max / (2^18 * mean W) after division by the summed weight
(~1e-8 for weights near W_max/100, ~1e-7 for weight 1 with the default W_max = 1e5).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from secagg.errors import AggregateCheckError, CiphertextError, OverflowRiskError
from secagg.keys import ClientKey, ServerKey, _scratch_dir

REALS_PER_CIPHERTEXT = 8192
VALUE_LIMIT = float(2**18)
EXTRA_SLOTS = 2  # weight and count, after the parameters


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A round's limits that keep every encrypted partial sum inside the CKKS range."""

    expected_clients: int
    max_weight: float
    value_bound: float

    @property
    def headroom(self) -> float:
        """The factor c in w = c * W / W_max: the largest one that cannot overflow."""
        return VALUE_LIMIT / (self.expected_clients * self.value_bound)

    def check(self) -> None:
        """Refuse limits that are nonsense or leave no precision."""
        if self.expected_clients < 1:
            raise OverflowRiskError("a round needs at least 1 expected client")
        if not (self.max_weight > 0 and math.isfinite(self.max_weight)):
            raise OverflowRiskError(f"max weight must be a positive number, got {self.max_weight}")
        if not (self.value_bound > 0 and math.isfinite(self.value_bound)):
            raise OverflowRiskError(f"value bound must be a positive number, got {self.value_bound}")
        if self.expected_clients > VALUE_LIMIT:
            raise OverflowRiskError(f"at most {int(VALUE_LIMIT)} clients fit in one round's count slot")


def num_ciphertexts(num_params: int) -> int:
    """How many ciphertexts an update of ``num_params`` values takes."""
    return max(1, math.ceil((num_params + EXTRA_SLOTS) / REALS_PER_CIPHERTEXT))


def encode_update(theta: np.ndarray, weight: float, bounds: Bounds) -> np.ndarray:
    """The vector a client encrypts, after checking it cannot overflow the encrypted sum."""
    if not (math.isfinite(weight) and weight > 0):
        raise OverflowRiskError(f"weight must be a positive finite number, got {weight}")
    if weight > bounds.max_weight:
        raise OverflowRiskError(
            f"weight {weight:g} exceeds the round's max weight {bounds.max_weight:g}; "
            f"create the round with --max-weight {weight:g} or larger (e.g. the largest site's sample count)"
        )
    if theta.size and not np.all(np.isfinite(theta)):
        raise OverflowRiskError("the model contains NaN or infinite values; fix the model before submitting")
    peak = float(np.max(np.abs(theta))) if theta.size else 0.0
    if peak > bounds.value_bound:
        raise OverflowRiskError(
            f"a model value of magnitude {peak:.4g} exceeds the round's value bound {bounds.value_bound:g}, so the "
            f"encrypted sum of {bounds.expected_clients} clients could overflow; create the round with "
            f"--value-bound {2 ** math.ceil(math.log2(peak)):g} or larger"
        )
    w = bounds.headroom * weight / bounds.max_weight
    return np.concatenate([theta * w, [w, 1.0]])


def decode_aggregate(vector: np.ndarray, contributions: int, bounds: Bounds) -> tuple[np.ndarray, float]:
    """(weighted mean of theta, summed weight) from a decrypted sum, after the integrity checks."""
    count = float(vector[-1])
    wsum = float(vector[-2])
    if not math.isfinite(count) or abs(count - contributions) > 1e-3:
        raise AggregateCheckError(
            f"the decrypted aggregate counts {count:.6g} contributions but the aggregator accepted {contributions}: "
            "it was decrypted with the wrong client.key or the sum is corrupted; nothing was written"
        )
    if not (0 < wsum <= contributions * bounds.headroom * (1 + 1e-6)):
        raise AggregateCheckError(f"the decrypted total weight {wsum:.6g} is impossible; the aggregate is corrupted")
    total_weight = wsum * bounds.max_weight / bounds.headroom
    return vector[:-EXTRA_SLOTS] / wsum, total_weight


class _Scratch:
    """A per-thread tmpfs file: SEAL's binding reads and writes ciphertexts only through paths."""

    _local = threading.local()

    @classmethod
    def path(cls) -> str:
        p = getattr(cls._local, "path", None)
        if p is None:
            p = os.path.join(_scratch_dir(), f"secagg-{os.getpid()}-{threading.get_ident()}.ct")
            cls._local.path = p
        return p


def encrypt(key: ClientKey, vector: np.ndarray, progress=None) -> list[bytes]:
    """Seeded symmetric ciphertexts of ``vector``, two reals per complex slot.

    ``progress(stage, done, total)`` is called after each ciphertext if given.
    """
    params = key.params
    encoder = seal.CKKSEncoder(params.context)
    encryptor = seal.Encryptor(params.context, key.secret_key)
    blobs = []
    scratch = _Scratch.path()
    n = num_ciphertexts(vector.size - EXTRA_SLOTS)
    padded = np.zeros(n * REALS_PER_CIPHERTEXT)
    padded[: vector.size] = vector
    try:
        for i in range(n):
            seg = padded[i * REALS_PER_CIPHERTEXT : (i + 1) * REALS_PER_CIPHERTEXT]
            pt = seal.Plaintext()
            encoder.encode((seg[0::2] + 1j * seg[1::2]).tolist(), params.scale, pt)
            encryptor.encrypt_symmetric(pt).save(scratch)
            blobs.append(Path(scratch).read_bytes())
            if progress:
                progress("encrypt", i + 1, n)
    finally:
        _unlink(scratch)
    return blobs


def decrypt(key: ClientKey, blobs: list[bytes], length: int) -> np.ndarray:
    """The first ``length`` reals of the decrypted ciphertexts."""
    params = key.params
    encoder = seal.CKKSEncoder(params.context)
    decryptor = seal.Decryptor(params.context, key.secret_key)
    out = np.empty(len(blobs) * REALS_PER_CIPHERTEXT)
    for i, blob in enumerate(blobs):
        ct = load_ciphertext(key, blob)
        pt = seal.Plaintext()
        decryptor.decrypt(ct, pt)
        z = np.asarray(encoder.decode_complex(pt))
        seg = out[i * REALS_PER_CIPHERTEXT : (i + 1) * REALS_PER_CIPHERTEXT]
        seg[0::2] = z.real
        seg[1::2] = z.imag
    return out[:length]


def load_ciphertext(key: ServerKey, blob: bytes) -> seal.Ciphertext:
    """Parse one ciphertext and check it fits the federation's parameters."""
    # SEAL's 16-byte header states the object's total size (uint64, little-endian, at byte 8). SEAL
    # itself ignores bytes after that, so a blob padded with junk would load, and the junk would be
    # stored in accepted/ until the round closes: refuse it instead.
    if len(blob) < 16 or int.from_bytes(blob[8:16], "little") != len(blob):
        raise CiphertextError(
            f"ciphertext of {len(blob)} bytes does not match the size in its own header; the update is truncated, "
            "padded or corrupt: resend it with the secagg client"
        )
    scratch = _Scratch.path()
    try:
        with open(scratch, "wb") as f:
            f.write(blob)
        ct = seal.Ciphertext()
        try:
            ct.load(key.context, scratch)
        except Exception as exc:  # SEAL signals bad data with several exception types
            raise CiphertextError(f"not a valid ciphertext for this key's parameters ({exc})") from exc
    finally:
        _unlink(scratch)
    if ct.size() != 2 or ct.coeff_modulus_size() != 1 or not ct.is_ntt_form() or ct.scale != key.params.scale:
        raise CiphertextError("ciphertext has the wrong size, level or scale for this federation's parameters")
    return ct


def save_ciphertext(ct: seal.Ciphertext) -> bytes:
    """Serialize an ordinary (not seeded) ciphertext."""
    scratch = _Scratch.path()
    try:
        ct.save(scratch)
        return Path(scratch).read_bytes()
    finally:
        _unlink(scratch)


class EncryptedSum:
    """The aggregator's running sum: one ciphertext per position, O(model) memory for any number of clients."""

    def __init__(self, key: ServerKey, length: int) -> None:
        self._key = key
        self._evaluator = seal.Evaluator(key.context)
        self._parts: list[seal.Ciphertext | None] = [None] * length
        self._counts = [0] * length  # ciphertexts added at each position

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, index: int, blob: bytes) -> None:
        """Parse ``blob`` and add it at ``index``."""
        ct = load_ciphertext(self._key, blob)
        self.add_parsed(index, ct)

    def add_parsed(self, index: int, ct: seal.Ciphertext) -> None:
        if self._parts[index] is None:
            self._parts[index] = ct
        else:
            self._evaluator.add_inplace(self._parts[index], ct)
        self._counts[index] += 1

    def subtract(self, index: int, blob: bytes) -> None:
        """Undo an :meth:`add` of ``blob`` exactly (modular arithmetic), for a rolled-back submission."""
        ct = load_ciphertext(self._key, blob)
        if self._counts[index] == 1:
            # Removing the only contribution empties the position. SEAL refuses to compute a zero
            # ("transparent") ciphertext, so sub_inplace would raise here and leave the sum damaged.
            self._parts[index] = None
        else:
            self._evaluator.sub_inplace(self._parts[index], ct)
        self._counts[index] -= 1

    def iter_blobs(self) -> Iterator[bytes]:
        """The sum, serialized one ciphertext at a time; raises if a position never received one."""
        if any(p is None for p in self._parts):
            raise CiphertextError("the encrypted sum is incomplete")
        for part in self._parts:
            yield save_ciphertext(part)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
