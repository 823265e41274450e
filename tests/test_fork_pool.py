"""A forked process pool of clients encrypts concurrently without corrupting each other's ciphertexts.

Python 3.11 forks by default on Linux: a child inherits the parent's thread-locals, including the
scratch file SEAL's path-only I/O goes through (secagg.ciphertexts._Scratch), so a child that
reused its parent's file would write over its siblings' ciphertexts.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

from secagg import ciphertexts
from secagg.keys import load_client_key

_KEY = None


def _encrypt(seed: int) -> tuple[list[float], list[tuple[bytes, bytes]]]:
    rng = np.random.default_rng(seed)
    reals = rng.normal(0, 1, 2 * ciphertexts.REALS_PER_CIPHERTEXT)
    out = []
    for _ in range(4):  # several in a row, so that the siblings' file writes interleave
        out = ciphertexts.encrypt(_KEY, reals)
    return reals.tolist(), out


def test_forked_workers_encrypt_concurrently(keypair):
    global _KEY
    _KEY = load_client_key(keypair.client)
    ciphertexts.encrypt(_KEY, np.zeros(ciphertexts.REALS_PER_CIPHERTEXT))  # the parent's scratch file exists
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_encrypt, range(9))
    for reals, cts in results:
        got = ciphertexts.decrypt(_KEY, [c0 for c0, _ in cts], [[seed] for _, seed in cts])
        assert np.max(np.abs(got - np.asarray(reals))) < 1e-6
