"""Read and write users' own model files as named numpy tensors.

The format is chosen by the file suffix (case-insensitive):

* ``.npz``           – numpy archives (:mod:`secagg.models.npz`)
* ``.keras``, ``.h5`` – Keras 3 models (:mod:`secagg.models.keras_files`)
* ``.pt``, ``.pth``  – PyTorch state dicts (:mod:`secagg.models.torch_files`)

TensorFlow/Keras and torch are imported only when a file of their format is read or written,
because the aggregator installs without them. Every failure a user can cause is raised as
:class:`~secagg.errors.ModelFormatError` with the path and what to do.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from secagg.errors import ModelFormatError
from secagg.packing import ModelTensors, TensorSpec

__all__ = ["SUPPORTED_SUFFIXES", "read_model", "write_model"]

SUPPORTED_SUFFIXES = (".keras", ".h5", ".pt", ".pth", ".npz")

# suffix -> (family, module). Files of one family can be converted into each other.
_FORMATS = {
    ".keras": ("Keras", "secagg.models.keras_files"),
    ".h5": ("Keras", "secagg.models.keras_files"),
    ".pt": ("PyTorch", "secagg.models.torch_files"),
    ".pth": ("PyTorch", "secagg.models.torch_files"),
    ".npz": ("numpy", "secagg.models.npz"),
}


def read_model(path: str | os.PathLike) -> ModelTensors:
    """Return the named tensors of the model file at ``path``.

    The dict is ordered in the file's natural, deterministic order (npz: stored order; Keras:
    ``model.weights`` order, which is ``get_weights()`` order; PyTorch: state-dict order). It is a
    :class:`~secagg.packing.ModelTensors`: for Keras files its ``layer_types`` give each tensor's
    layer class (``"LSTM"``, ``"Bidirectional/LSTM"``); PyTorch and npz files record none. Raises
    ModelFormatError if the file is missing, corrupt, of an unsupported suffix, or needs a framework
    that is not installed.
    """
    path = pathlib.Path(path)
    module = _module_for(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    tensors = module.read(path)
    return tensors if isinstance(tensors, ModelTensors) else ModelTensors(tensors)


def write_model(
    template: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    out: str | os.PathLike,
) -> pathlib.Path:
    """Write ``tensors`` into a copy of the model file ``template`` and save it at ``out``.

    The written file has the template's architecture/config, the template's tensor names and the
    template's dtype for every tensor (floats are rounded to nearest, integers via ``np.rint``).
    ``tensors`` holding exactly the template's names are matched by name; any other names, or a
    plain sequence of arrays (``model.get_weights()``), are matched by position in the template's
    order, with the template's shapes (and layer types, where both sides record them). ``out`` must be of the template's
    format family (``.keras`` and ``.h5`` convert into each other; ``.pt``/``.pth`` are one).
    The file is written to a temporary name and renamed, so a failed write never leaves a
    half-written ``out`` (and ``out`` may be the template itself). Returns ``out`` as a Path.
    """
    template, out = pathlib.Path(template), pathlib.Path(out)
    module = _module_for(template)
    family = _FORMATS[template.suffix.lower()][0]
    out_format = _FORMATS.get(out.suffix.lower())
    if out_format is None or out_format[0] != family:
        raise ModelFormatError(
            f"{out}: cannot write a {family} model (template {template.name}) to a "
            f"{out.suffix or 'suffix-less'} file; give the output file the template's suffix "
            f"{template.suffix}"
        )
    if not template.is_file():
        raise ModelFormatError(f"{template}: no such template model file")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temporary sibling with a lower-case suffix: frameworks dispatch on it.
    tmp = out.with_name(f".{out.stem}.{secrets.token_hex(4)}.tmp{out.suffix.lower()}")
    try:
        module.write(template, tensors, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _module_for(path: pathlib.Path):
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ModelFormatError(
            f"{path}: unsupported model file suffix {path.suffix or '(none)'!r}; "
            f"save the model as one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    # Imported on demand so that only the needed adapter (and its framework) is loaded.
    return importlib.import_module(fmt[1])


# --- helpers shared by the format modules -------------------------------------------------

# dtype kinds we can carry: bool, signed/unsigned integers, floats.
NUMERIC_KINDS = "biuf"


def check_numeric(path: pathlib.Path, name: str, dtype: np.dtype) -> None:
    """Raise ModelFormatError unless ``dtype`` is bool, integer or floating point."""
    if np.dtype(dtype).kind not in NUMERIC_KINDS:
        raise ModelFormatError(
            f"{path}: tensor {name!r} has dtype {dtype}; only bool, integer and floating point "
            "tensors are supported"
        )


def conform(
    template: pathlib.Path,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    tensors: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    layer_types: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Check ``tensors`` against the template's ``specs`` (name -> (shape, dtype)) and cast.

    ``tensors`` with exactly the template's names are matched by name; others (another model's
    names, or a sequence of arrays) by position, and then also by layer type where both the
    template (``layer_types``) and ``tensors`` (a :class:`ModelTensors`) record one.
    Returns the arrays under the template's names in its order, each cast to the template's
    dtype. Raises ModelFormatError naming the first mis-shaped, missing, extra or uncastable
    tensor, with both sides.
    """
    if isinstance(tensors, Mapping) and set(tensors) == set(specs):
        arrays = {name: np.asarray(tensors[name]) for name in specs}
    else:
        arrays = _by_position(template, specs, tensors, layer_types or {})
    result = {}
    for name, (shape, dtype) in specs.items():
        arr = arrays[name]
        if arr.shape != tuple(shape):
            raise ModelFormatError(
                f"tensor {name!r} has shape {arr.shape} but template {template} has shape "
                f"{tuple(shape)}"
            )
        check_numeric(template, name, arr.dtype)
        result[name] = cast_to(name, arr, np.dtype(dtype), template)
    return result


def _by_position(
    template: pathlib.Path,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    tensors: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    layer_types: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """The template's names -> ``tensors`` in order, refusing the first position whose shape or layer type differs."""
    if isinstance(tensors, Mapping):
        theirs_types = getattr(tensors, "layer_types", None) or {}
        given = [(name, np.asarray(arr), theirs_types.get(name, "")) for name, arr in tensors.items()]
    else:
        given = [(f"#{i + 1}", np.asarray(arr), "") for i, arr in enumerate(tensors)]
    mine = [TensorSpec(name, tuple(shape), str(np.dtype(dtype)), layer_types.get(name, ""))
            for name, (shape, dtype) in specs.items()]
    theirs = [TensorSpec(name, arr.shape, str(arr.dtype), lt) for name, arr, lt in given]
    n, m = len(mine), len(theirs)
    for i in range(max(n, m)):
        a = mine[i] if i < n else None
        b = theirs[i] if i < m else None
        # Dtypes may differ: an average arrives as float64, a counter as a float; cast_to converts.
        if a is None or b is None or a.shape != b.shape or (a.layer_type and b.layer_type
                                                             and a.layer_type != b.layer_type):
            counts = "" if n == m else f" (the template has {n} tensors, the tensors to write have {m})"
            raise ModelFormatError(
                f"the tensors to write do not match template {template} at tensor {i + 1} of {n}{counts}: "
                f"the template has {a.describe() if a else 'no tensor there'}, the tensors to write have "
                f"{b.describe() if b else 'no tensor there'}. Names may differ; the layers must be the same kinds "
                "and sizes in the same order: the tensors must come from a model built with the same code as the "
                "template"
            )
    return {a.name: arr for a, (_, arr, _) in zip(mine, given)}


def cast_to(name: str, arr: np.ndarray, dtype: np.dtype, template: pathlib.Path) -> np.ndarray:
    """Cast ``arr`` to ``dtype``: floats round to nearest, integers via ``np.rint``.

    Refuses casts that would silently corrupt the model: finite values overflowing to inf, and
    non-finite or out-of-range values for integer tensors.
    """

    def fail(why: str) -> ModelFormatError:
        return ModelFormatError(
            f"tensor {name!r} cannot be stored as {dtype} in a model like {template}: {why}"
        )

    if dtype.kind == "b":
        # Averaged flags round to the nearer of 0 and 1 (ties to even, i.e. 0.5 -> False).
        return arr.copy() if arr.dtype.kind == "b" else np.rint(arr) != 0
    if dtype.kind == "f":
        cast = arr.astype(dtype)
        if arr.dtype.kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(arr)):
            raise fail("values overflow its range")
        return cast
    # integer target
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise fail("it has NaN or infinite values")
        arr = np.rint(arr)
    if arr.size and arr.dtype.kind != "b":
        info = np.iinfo(dtype)
        # Compare as Python ints/floats: numpy comparisons across int64/uint64 are lossy.
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise fail(f"values outside [{info.min}, {info.max}]")
    return arr.astype(dtype)

