"""Named tensors <-> one flat float64 vector, in a deterministic order, described by a ModelSpec.

Only floating-point tensors are aggregated. Integer and boolean tensors (BatchNorm's
``num_batches_tracked``, step counters, masks) are listed in the spec, so architectures must still
match exactly, but they never leave the site: averaging a counter has no meaning and large counters
would eat the CKKS value range. ``fetch`` copies them from the caller's template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import numpy as np

from secagg.errors import ModelFormatError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its name, shape, dtype, and whether it is aggregated."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def aggregated(self) -> bool:
        return self.dtype in ("bfloat16",) or np.dtype(self.dtype).kind in "fc"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture as the aggregator sees it: tensor names, shapes and dtypes, no values."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> "ModelSpec":
        """The spec of a model's named tensors, in their given order."""
        return cls(tuple(TensorSpec(n, tuple(int(d) for d in a.shape), str(a.dtype)) for n, a in tensors.items()))

    @property
    def num_params(self) -> int:
        """How many values are aggregated (floating-point tensors only)."""
        return sum(t.size for t in self.tensors if t.aggregated)

    def to_json(self) -> str:
        return json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            rows = json.loads(text)
            spec = cls(tuple(TensorSpec(str(n), tuple(_dim(d) for d in s), _dtype(dt)) for n, s, dt in rows))
        except (ValueError, TypeError, OverflowError) as exc:
            raise ModelFormatError(f"malformed model spec: {exc}; send the template through the secagg client") from exc
        names = [t.name for t in spec.tensors]
        if len(set(names)) != len(names):
            raise ModelFormatError("malformed model spec: a tensor name appears twice")
        if spec.num_params > MAX_SPEC_PARAMS:
            raise ModelFormatError(f"malformed model spec: {spec.num_params} parameters is beyond any model secagg "
                                   f"can aggregate ({MAX_SPEC_PARAMS})")
        return spec

    @property
    def hash(self) -> str:
        """SHA-256 over names, shapes and dtypes in order: two models match iff their hashes do."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def describe_difference(self, other: "ModelSpec") -> str:
        """A short, human reason why ``other`` is not this spec (first differing tensor)."""
        mine = {t.name: t for t in self.tensors}
        theirs = {t.name: t for t in other.tensors}
        for name in mine.keys() - theirs.keys():
            return f"tensor '{name}' is missing"
        for name in theirs.keys() - mine.keys():
            return f"unexpected tensor '{name}'"
        for a, b in zip(self.tensors, other.tensors):
            if a.name != b.name:
                return f"tensor order differs at '{a.name}' vs '{b.name}'"
            if a.shape != b.shape:
                return f"tensor '{a.name}' has shape {b.shape}, expected {a.shape}"
            if a.dtype != b.dtype:
                return f"tensor '{a.name}' has dtype {b.dtype}, expected {a.dtype}"
        return "specs are identical"


def flatten(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The aggregated tensors of ``tensors`` as one float64 vector, in spec order."""
    actual = ModelSpec.of(tensors)
    if actual != spec:
        raise ModelFormatError(f"model does not match the round's architecture: {spec.describe_difference(actual)}")
    parts = [np.asarray(tensors[t.name], dtype=np.float64).ravel() for t in spec.tensors if t.aggregated]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def unflatten(spec: ModelSpec, vector: np.ndarray, template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tensors from a flat vector; non-aggregated tensors are copied from ``template``."""
    if vector.size != spec.num_params:
        raise ModelFormatError(f"vector has {vector.size} values, the spec needs {spec.num_params}")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for t in spec.tensors:
        if t.aggregated:
            out[t.name] = vector[pos : pos + t.size].reshape(t.shape)
            pos += t.size
        else:
            out[t.name] = np.array(template[t.name], copy=True)
    return out


#: No spec can describe more values than this (2^40): beyond it sizes overflow int64 products long
#: before any aggregator could hold the sum. The aggregator's own, much lower limit is --max-params.
MAX_SPEC_PARAMS = 2**40


def _dim(d) -> int:
    """A tensor dimension from JSON: a whole number 0 <= d <= 2^40 (no floats, no booleans)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_SPEC_PARAMS:
        raise ValueError(f"dimension {d!r} is not a whole number between 0 and {MAX_SPEC_PARAMS}")
    return d


def _dtype(dt) -> str:
    """A dtype name numpy knows (or bfloat16)."""
    if not isinstance(dt, str):
        raise ValueError(f"dtype {dt!r} is not a name")
    if dt == "bfloat16":
        return dt
    try:
        np.dtype(dt)
    except TypeError as exc:
        raise ValueError(f"unknown dtype {dt!r}") from exc
    return dt
