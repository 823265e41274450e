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
from collections.abc import Mapping
import numpy as np

from secagg.errors import ModelFormatError

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


def read_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the named tensors of the model file at ``path``.

    The dict is ordered in the file's natural, deterministic order (npz: stored order; Keras:
    ``model.weights`` order; PyTorch: state-dict order). Raises ModelFormatError if the file is
    missing, corrupt, of an unsupported suffix, or needs a framework that is not installed.
    """
    path = pathlib.Path(path)
    module = _module_for(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    return module.read(path)


def write_model(
    template: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    out: str | os.PathLike,
) -> pathlib.Path:
    """Write ``tensors`` into a copy of the model file ``template`` and save it at ``out``.

    The written file has the template's architecture/config and the template's dtype for every
    tensor (floats are rounded to nearest, integers via ``np.rint``). ``tensors`` must hold
    exactly the template's names with the template's shapes. ``out`` must be of the template's
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
    tensors: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Check ``tensors`` against the template's ``specs`` (name -> (shape, dtype)) and cast.

    Returns the arrays in the template's order, each cast to the template's dtype. Raises
    ModelFormatError naming the first missing, extra, mis-shaped or uncastable tensor.
    """
    missing = [n for n in specs if n not in tensors]
    if missing:
        raise ModelFormatError(
            f"tensor {missing[0]!r} of template {template} is missing from the tensors to write"
            + _and_more(missing)
        )
    extra = [n for n in tensors if n not in specs]
    if extra:
        raise ModelFormatError(
            f"tensor {extra[0]!r} is not in template {template}" + _and_more(extra)
            + "; the tensors must come from a model with the template's architecture"
        )
    result = {}
    for name, (shape, dtype) in specs.items():
        arr = np.asarray(tensors[name])
        if arr.shape != tuple(shape):
            raise ModelFormatError(
                f"tensor {name!r} has shape {arr.shape} but template {template} has shape "
                f"{tuple(shape)}"
            )
        check_numeric(template, name, arr.dtype)
        result[name] = cast_to(name, arr, np.dtype(dtype), template)
    return result


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


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
