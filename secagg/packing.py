"""Named tensors <-> one flat float64 vector, in a deterministic order, described by a ModelSpec.

Models match by **structure**, not by name: two models fit one round when their tensors agree, in
order, in shape and dtype (the order ``model.get_weights()`` or ``state_dict()`` gives), and in the
type of the layer owning each tensor where the model file tells it (Keras). Names are labels: a
notebook that builds four identical Keras models gets ``lstm``, ``lstm_1``, ... and they still match.
The round's spec pins the architecture; a fetched average is written under the caller's own names.

Only floating-point tensors are aggregated. Integer and boolean tensors (BatchNorm's
``num_batches_tracked``, step counters, masks) are listed in the spec, so architectures must still
match exactly, but they never leave the site: averaging a counter has no meaning and large counters
would eat the CKKS value range. ``fetch`` copies them from the caller's template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping

import numpy as np

from secagg.errors import ModelFormatError

#: What to do when two models do not match, said after every such error.
SAME_ARCHITECTURE = ("Names may differ; the layers must be the same kinds and sizes in the same order: build every "
                     "site's model with the same code as the round's template.")


class ModelTensors(dict):
    """A model's named tensors (name -> array, in the model's order) and the layer type of each.

    A plain ``dict`` in every way; ``layer_types`` maps a tensor's name to the class name of the
    layer that owns it (``"LSTM"``, ``"Dense"``, ``"Bidirectional/LSTM"`` for a wrapped layer) for
    the formats that tell it (Keras). A name it lacks, or ``""``, means unknown. Copying the dict
    (``dict(tensors)``) drops the layer types; a spec then compares shapes and dtypes only.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray] | None = None,
                 layer_types: Mapping[str, str] | None = None) -> None:
        super().__init__(tensors or {})
        self.layer_types: dict[str, str] = dict(layer_types or {})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its name (a label), shape, dtype and owning layer's type ("" = unknown)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer_type: str = ""

    @property
    def aggregated(self) -> bool:
        return self.dtype in ("bfloat16",) or np.dtype(self.dtype).kind in "fc"

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: a product of large dimensions must not wrap around

    def matches(self, other: "TensorSpec") -> bool:
        """Same shape and dtype, and the same layer type unless one side does not know it. Names are not compared."""
        return (self.shape == other.shape and self.dtype == other.dtype
                and (not self.layer_type or not other.layer_type or self.layer_type == other.layer_type))

    def describe(self) -> str:
        """``'lstm/lstm_cell/bias' (32,) float32 (LSTM)``: what a user recognises the tensor by."""
        return f"{self.name!r} {self.shape} {self.dtype}" + (f" ({self.layer_type})" if self.layer_type else "")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture as the aggregator sees it: per tensor a name, shape, dtype and layer type; no values."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], layer_types: Mapping[str, str] | None = None) -> "ModelSpec":
        """The spec of a model's named tensors, in their given order.

        Layer types come from ``layer_types``, else from ``tensors.layer_types`` (a :class:`ModelTensors`).
        """
        types = layer_types if layer_types is not None else getattr(tensors, "layer_types", None) or {}
        return cls(tuple(TensorSpec(n, tuple(int(d) for d in a.shape), str(a.dtype), types.get(n, ""))
                         for n, a in tensors.items()))

    @property
    def num_params(self) -> int:
        """How many values are aggregated (floating-point tensors only)."""
        return sum(t.size for t in self.tensors if t.aggregated)

    def to_json(self) -> str:
        """``[[name, shape, dtype, layer_type], ...]``; the layer type is left out where it is unknown."""
        return json.dumps([[t.name, list(t.shape), t.dtype] + ([t.layer_type] if t.layer_type else [])
                           for t in self.tensors], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Rows of ``[name, shape, dtype]`` or ``[name, shape, dtype, layer_type]``."""
        if not isinstance(text, str) or len(text) > MAX_SPEC_JSON:
            raise ModelFormatError(f"malformed model spec: longer than {MAX_SPEC_JSON} characters")
        try:
            rows = json.loads(text)
            spec = cls(tuple(_tensor_spec(row) for row in rows))
        except RecursionError:
            raise ModelFormatError("malformed model spec: nested too deeply; send the template through the secagg "
                                   "client") from None
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
        """SHA-256 over the structure: shape, dtype and layer type of every tensor in order, never the names.

        Two models of one architecture have the same hash however their layers are named. Specs that
        record layer types on one side only may match (:meth:`matches`) with different hashes.
        """
        structure = [[list(t.shape), t.dtype, t.layer_type] for t in self.tensors]
        return hashlib.sha256(json.dumps(structure, separators=(",", ":")).encode()).hexdigest()

    def matches(self, other: "ModelSpec") -> bool:
        """True if ``other`` has this architecture: tensor by tensor, see :meth:`TensorSpec.matches`."""
        return len(self.tensors) == len(other.tensors) and all(
            a.matches(b) for a, b in zip(self.tensors, other.tensors))

    def describe_difference(self, other: "ModelSpec", mine: str = "the round", theirs: str = "this model") -> str:
        """Where ``other`` first differs from this spec, with both sides, e.g. ``at tensor 3 of 5: the round
        has 'lstm/lstm_cell/bias' (32,) float32 (LSTM), this model has 'dense/kernel' (8, 1) float32 (Dense)``.
        ``mine`` and ``theirs`` name the two sides."""
        n, m = len(self.tensors), len(other.tensors)
        counts = "" if n == m else f" ({mine} has {n} tensors, {theirs} has {m})"
        for i in range(max(n, m)):
            a = self.tensors[i] if i < n else None
            b = other.tensors[i] if i < m else None
            if a is None or b is None or not a.matches(b):
                return (f"at tensor {i + 1} of {n}{counts}: {mine} has {a.describe() if a else 'no tensor there'}, "
                        f"{theirs} has {b.describe() if b else 'no tensor there'}")
        return "the architectures match"


def check_matches(spec: ModelSpec, actual: ModelSpec, theirs: str = "this model",
                  what: str = "model does not match the round's architecture") -> None:
    """Raise ModelFormatError naming the first differing tensor on both sides and the fix."""
    if not spec.matches(actual):
        raise ModelFormatError(f"{what} {spec.describe_difference(actual, 'the round', theirs)}. {SAME_ARCHITECTURE}")


def flatten(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The aggregated tensors of ``tensors`` as one float64 vector, matched to the spec by position."""
    check_matches(spec, ModelSpec.of(tensors))
    parts = [np.asarray(arr, dtype=np.float64).ravel() for t, arr in zip(spec.tensors, tensors.values()) if t.aggregated]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def unflatten(spec: ModelSpec, vector: np.ndarray, template: Mapping[str, np.ndarray]) -> ModelTensors:
    """Tensors from a flat vector under the template's names, by position; non-aggregated tensors are
    copied from ``template``. The template must have the spec's architecture (names may differ)."""
    if vector.size != spec.num_params:
        raise ModelFormatError(f"vector has {vector.size} values, the spec needs {spec.num_params}")
    check_matches(spec, ModelSpec.of(template), "the template",
                  "the template does not match the round's architecture")
    out = ModelTensors(layer_types=getattr(template, "layer_types", None))
    pos = 0
    for t, (name, arr) in zip(spec.tensors, template.items()):
        if t.aggregated:
            out[name] = vector[pos : pos + t.size].reshape(t.shape)
            pos += t.size
        else:
            out[name] = np.array(arr, copy=True)
    return out


#: No spec can describe more values than this (2^40): beyond it sizes overflow int64 products long
#: before any aggregator could hold the sum. The aggregator's own, much lower limit is --max-params.
MAX_SPEC_PARAMS = 2**40
#: Longest spec JSON accepted (a million tensors of ordinary names fits).
MAX_SPEC_JSON = 64 * 1024 * 1024
#: Longest layer type a spec may carry (wrapper/inner class names are far shorter).
MAX_LAYER_TYPE = 200


def _tensor_spec(row) -> TensorSpec:
    if not isinstance(row, list) or len(row) not in (3, 4):
        raise ValueError(f"row {row!r} is not [name, shape, dtype] or [name, shape, dtype, layer_type]")
    name, shape, dtype = row[:3]
    return TensorSpec(str(name), tuple(_dim(d) for d in shape), _dtype(dtype), _layer_type(row[3]) if len(row) == 4 else "")


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


def _layer_type(lt) -> str:
    """A layer type: class names joined by '/', printable, at most MAX_LAYER_TYPE characters."""
    if not isinstance(lt, str) or len(lt) > MAX_LAYER_TYPE or not lt.isprintable():
        raise ValueError(f"layer type {str(lt)[:40]!r} is not a short, printable name")
    return lt
