"""What leaves a client after decryption: sums rounded to an absolute grid far above the CKKS noise.

A raw CKKS decryption carries the scheme's noise in its low-order bits, and whoever also holds the
ciphertext (the aggregator holds the encrypted sum) can solve an exact decryption for the secret
key (Li and Micciancio, EUROCRYPT 2021). Relative rounding (to float32) is not enough: where a
released value is near zero, float32 keeps the noise to 24 bits, and one release plus the
ciphertext gave the key (measured). So every decrypted sum is rounded to an **absolute** grid: a
power of two at least ``GRID_FACTOR`` (2^10) times the round's noise bound, computed from the
parameters alone (:func:`noise_std`): the released grid point is the same for every noise draw
except within one noise bound of a grid boundary, where it tells at most whether the noise was
above or below a threshold 2^10 times its own size away.

Everything is rounded in the encoded domain, before dividing by the summed weight: the weighted
sums and the summed weight itself (so ``total_weight`` is rounded too). A released average is a
ratio of two grid points.

Noise model (measured in ``tests/test_release_grid.py``: empirical/model std 1.018, 1.007, 1.007 for
1, 3, 20 contributions): one fresh symmetric encryption adds to every
real of the decoded slot vector an error of standard deviation sqrt(N/2 * (sigma^2 + 1/12)) / scale,
sigma = 3.2 (SEAL's error distribution) and 1/12 from rounding the encoded coefficients, i.e. 1.9e-10
at N = 8192, scale 2^40; a sum of n contributions has sqrt(n) times that.
"""

from __future__ import annotations

import math

import numpy as np

from secagg.keys import POLY_MODULUS_DEGREE, SCALE_BITS

ERROR_SIGMA = 3.2  # SEAL's default standard deviation of the encryption error
NOISE_SIGMAS = 10.0  # the noise bound, in standard deviations
GRID_FACTOR = 2.0**10


def noise_std(contributions: int) -> float:
    """Standard deviation of the decryption noise of each real of a sum of ``contributions`` ciphertexts."""
    one = math.sqrt(POLY_MODULUS_DEGREE / 2 * (ERROR_SIGMA**2 + 1 / 12)) / 2.0**SCALE_BITS
    return math.sqrt(max(contributions, 1)) * one


def grid(contributions: int) -> float:
    """The release grid of a sum of ``contributions``: the power of two >= 2^10 x its noise bound."""
    return 2.0 ** math.ceil(math.log2(GRID_FACTOR * NOISE_SIGMAS * noise_std(contributions)))


def release(sums: np.ndarray, contributions: int) -> np.ndarray:
    """``sums`` (decrypted, encoded domain) rounded to the grid of ``contributions``."""
    g = grid(contributions)
    return np.round(np.asarray(sums, dtype=np.float64) / g) * g
