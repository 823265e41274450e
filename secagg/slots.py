"""What a ciphertext's 8,192 reals hold: the update's values, a count, and integrity checks.

Every ciphertext carries ``DATA_SLOTS`` (8,175) values of the flat vector ``[w*theta, w]`` (the
weighted parameters and the weight, padded with zeros), then:

* a **count** slot of 1: the sum's count slot must equal the number of contributions in EVERY
  ciphertext, so a wrong key or a sum missing, repeating or inventing a contribution anywhere is
  caught (a corrupted block cannot hide behind a healthy last one);
* ``CHECK_SLOTS`` (32) **check** slots, each a secret linear combination of the ciphertext's data
  slots: ``c_t = <s_t, v> / sqrt(DATA_SLOTS)`` with signs s_t in {-1, +1} drawn from a key derived
  from ``client.key`` for this round and this ciphertext (:class:`Checks`). Sums keep the relation,
  so after decryption a client recomputes ``<s_t, v_sum>`` and compares. The aggregator does not know
  the signs, so whatever it adds to the data slots (adding a plaintext to a ciphertext needs no key)
  moves each check by an independent, unpredictable amount: a shift in a random direction of L2 norm
  D over a ciphertext's data slots passes all 32 checks with probability P(|Z| < 90.3 tau / D)^32, Z
  standard normal (90.3 = sqrt(DATA_SLOTS); tau the check tolerance, 10 sqrt(17) = 41 standard
  deviations of the noise: see CHECK_SCALE below); a shift of one slot passes only if every check slot is moved by exactly its secret
  share, a guess right with probability 2^-32. Measured detection rates: docs/privacy-audit.md.

Overflow: CKKS wraps silently once a sum leaves (-2^19, 2^19) at scale 2^40 with a 60-bit prime. A
round fixes its expected number of clients N, a maximum weight W_max and a bound B on |theta|. Each
client encodes w = c * W / W_max with c = LIMIT / (N * B), so every data slot of every partial sum
stays below LIMIT = 2^18 (half the hard bound, for CKKS noise). A check slot is bounded by the same
per-client limit: a check is stored at 1/``CHECK_SCALE`` (1/4) of its value, and the value is a
normalized signed sum of the data, whose standard deviation is at most the largest |value| (1/sqrt(3)
of it for values spread over the whole bound), so it would take a 4- to 7-standard-deviation draw to
overflow (still refused before encrypting, if it ever happened). The price: the stored check's noise
counts 4 times when compared, which the tolerance includes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math

import numpy as np

from secagg.errors import AggregateCheckError, OverflowRiskError
from secagg.release import noise_std

REALS_PER_CIPHERTEXT = 8192
CHECK_SLOTS = 32
DATA_SLOTS = REALS_PER_CIPHERTEXT - 1 - CHECK_SLOTS
COUNT_SLOT = DATA_SLOTS
VALUE_LIMIT = float(2**18)
EXTRA_SLOTS = 1  # the weight, after the parameters
#: Tolerance of a decrypted count or check, in standard deviations of its noise (false alarm < 1e-20 per check).
CHECK_SIGMAS = 10.0
#: Check slots hold c_t / CHECK_SCALE, so that values anywhere within the round's bound cannot overflow them.
CHECK_SCALE = 4.0


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
    return max(1, math.ceil((num_params + EXTRA_SLOTS) / DATA_SLOTS))


class Checks:
    """The secret signs of a round's check slots, derived from ``client.key`` (the aggregator cannot).

    ``key`` is 32 bytes from :meth:`secagg.keys.ClientKey.derive`; per round and ciphertext the
    signs are SHAKE-256 output of HMAC(key, round id, index): fresh for every round.
    """

    def __init__(self, key: bytes, round_id: str) -> None:
        self._round_key = hmac.new(key, b"round\0" + round_id.encode(), hashlib.sha256).digest()

    def _bits(self, index: int) -> np.ndarray:
        seed = hmac.new(self._round_key, index.to_bytes(8, "big"), hashlib.sha256).digest()
        bits = np.unpackbits(np.frombuffer(hashlib.shake_256(seed).digest(CHECK_SLOTS * DATA_SLOTS // 8 + 1),
                                           dtype=np.uint8))[:CHECK_SLOTS * DATA_SLOTS]
        return bits.reshape(CHECK_SLOTS, DATA_SLOTS)

    def signs(self, index: int) -> np.ndarray:
        """(CHECK_SLOTS, DATA_SLOTS) of +-1/sqrt(DATA_SLOTS) for ciphertext ``index``."""
        return (self._bits(index).astype(np.float64) * 2.0 - 1.0) / math.sqrt(DATA_SLOTS)

    def apply(self, index: int, data: np.ndarray) -> np.ndarray:
        """``signs(index) @ data``, computed from the bits without building the float matrix: s = 2 b - 1,
        so s @ v = 2 (b @ v) - sum(v)."""
        bits = self._bits(index)
        return (2.0 * (bits @ data) - float(np.sum(data))) / math.sqrt(DATA_SLOTS)


def encode_update(theta: np.ndarray, weight: float, bounds: Bounds, checks: Checks) -> np.ndarray:
    """The reals a client encrypts (a whole number of ciphertexts), after checking they cannot overflow."""
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
    n = num_ciphertexts(theta.size)
    data = np.zeros(n * DATA_SLOTS)
    data[:theta.size] = theta * w
    data[theta.size] = w
    data = data.reshape(n, DATA_SLOTS)
    out = np.zeros((n, REALS_PER_CIPHERTEXT))
    out[:, :DATA_SLOTS] = data
    out[:, COUNT_SLOT] = 1.0
    limit = VALUE_LIMIT / bounds.expected_clients
    for i in range(n):
        check = checks.apply(i, data[i]) / CHECK_SCALE
        if float(np.max(np.abs(check))) > limit:  # a 4- to 7-sigma draw: practically never
            raise OverflowRiskError(
                f"the update's values line up with a secret integrity check so far that its slot could overflow; "
                f"create the round with a larger --value-bound (e.g. {2 * bounds.value_bound:g})")
        out[i, COUNT_SLOT + 1:] = check
    return out.reshape(-1)


def decode_aggregate(reals: np.ndarray, num_params: int, contributions: int, checks: Checks) -> np.ndarray:
    """The summed ``[w*theta, w]`` (length num_params + 1) from a decrypted sum, after every count and check.

    Raises :class:`AggregateCheckError`, naming the ciphertext, when a count differs from
    ``contributions`` (wrong key, a missing, repeated or invented contribution) or a check fails
    (the sum was altered): nothing of it may be used.
    """
    n = num_ciphertexts(num_params)
    blocks = reals.reshape(n, REALS_PER_CIPHERTEXT)
    sigma = noise_std(contributions)
    count_tol = max(1e-3, CHECK_SIGMAS * sigma)
    check_tol = CHECK_SIGMAS * math.sqrt(CHECK_SCALE**2 + 1.0) * sigma
    for i, block in enumerate(blocks):
        count = float(block[COUNT_SLOT])
        if not math.isfinite(count) or abs(count - contributions) > count_tol:
            raise AggregateCheckError(
                f"ciphertext {i} of the sum counts {count:.6g} contributions but the round lists {contributions}: it "
                "was decrypted with the wrong client.key, or the aggregator left out, repeated or invented a "
                "contribution; nothing was written"
            )
        diff = CHECK_SCALE * block[COUNT_SLOT + 1:] - checks.apply(i, block[:DATA_SLOTS])
        if not np.all(np.abs(diff) <= check_tol):
            raise AggregateCheckError(
                f"ciphertext {i} of the sum fails its integrity check (off by {float(np.max(np.abs(diff))):.3g}, "
                f"tolerance {check_tol:.3g}): the aggregator altered the encrypted sum; nothing was written"
            )
    return blocks[:, :DATA_SLOTS].reshape(-1)[:num_params + EXTRA_SLOTS].copy()
