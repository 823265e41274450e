"""Who masks with whom: all other sites in small cohorts, a k-regular graph drawn from a public seed in large ones.

The seed is a hash of every advertised key (:func:`secagg.masking.statements.cohort_digest`): every
site computes the graph itself, the aggregator cannot pick it after the keys are known without
dropping advertisers (which every site sees). A site's share holders are its neighbours and itself.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from secagg.errors import MaskingError

#: Neighbours in a large cohort: 2 * ceil(log2 n), at least 8 (SecAgg+ grows the degree with log n).
MIN_DEGREE = 8


def default_degree(n: int) -> int:
    """Neighbours per site for a cohort of ``n``: every other site up to 9 sites, else an even ~2 log2 n."""
    if n <= MIN_DEGREE + 1:
        return max(0, n - 1)
    return min(n - 1, max(MIN_DEGREE, 2 * math.ceil(math.log2(n))))


def holders_count(n: int, degree: int) -> int:
    """Share holders of one site: its neighbours and itself."""
    return min(n - 1, degree) + 1


def default_threshold(n: int, degree: int) -> int:
    """A strict majority of a site's share holders: the smallest threshold a site accepts."""
    return holders_count(n, degree) // 2 + 1


def neighbours(members: Sequence[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each member's neighbours: everyone else when ``degree >= n - 1``, else a ring of ``degree`` (even) around
    a random order drawn from ``seed``: ``degree/2`` on each side. Symmetric by construction."""
    members = sorted(members)
    n = len(members)
    if len(set(members)) != n:
        raise MaskingError("a cohort lists a site twice")
    if degree >= n - 1:
        return {m: tuple(x for x in members if x != m) for m in members}
    if degree < 2 or degree % 2:
        raise MaskingError(f"a neighbour degree of {degree}: use an even number of at least 2")
    # A random order every site derives alike: members sorted by a keyed hash of their ids.
    order = sorted(members, key=lambda m: hashlib.sha256(b"secagg-graph" + seed + m.encode()).digest())
    where = {m: i for i, m in enumerate(order)}
    half = degree // 2
    return {m: tuple(sorted(order[(where[m] + d) % n] for d in range(-half, half + 1) if d)) for m in members}
