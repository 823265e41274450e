"""What leaves a client after decryption: rounded values, never raw CKKS decryptions.

A raw CKKS decryption carries the scheme's noise in its low-order bits. Whoever also holds the
ciphertext (the aggregator holds the encrypted sum) can use an exact decryption to solve for the
secret key (Li and Micciancio, "On the security of homomorphic encryption on approximate numbers",
EUROCRYPT 2021). So every decrypted value a client returns to its caller, writes to a model file,
or feeds into a later exchange goes through :func:`release` first: rounded to float32, which drops
the low 29 of float64's 52 mantissa bits, where the decryption noise lives (CKKS with scale 2^40
decrypts model-sized values to about 1e-7 absolute; float32 keeps about 7 significant digits).
Model files store float32 anyway, so nothing a user sees loses precision it had.

This is the rounding the issue asks for, not a proof: a value whose decryption error straddles a
float32 rounding boundary still leaks a bit. Secagg never sends decryptions back to the aggregator
(later exchanges send fresh ciphertexts), so the aggregator never holds a decryption of its own
ciphertext; the rounding protects published values (model files, printed numbers).
"""

from __future__ import annotations

import numpy as np


def release(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32 precision (returned as float64, so the caller's dtype is unchanged)."""
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)
