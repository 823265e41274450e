"""PyTorch ``.pt``/``.pth`` files holding a state dict.

Accepted layouts: a state dict (``model.state_dict()``) at the top level, or nested under
``"state_dict"`` or ``"model_state_dict"`` in a checkpoint dict; when writing, the nesting and
all other top-level entries of the template (epoch, optimizer state, ...) are kept unchanged.
Files are loaded with ``weights_only=True``, so a pickled whole ``nn.Module`` is refused.

numpy has no bfloat16 (or float8): such tensors are read as float32 and cast back to the
template's dtype on write (round to nearest even).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping

import numpy as np

from secagg.errors import ModelFormatError
from secagg.models import check_numeric, conform

_NESTING_KEYS = ("state_dict", "model_state_dict")
_SAVE_STATE_DICT = "save model.state_dict() instead (torch.save(model.state_dict(), path))"


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Return the state dict's tensors as numpy arrays, in state-dict order."""
    torch = _import_torch("reading", path)
    _, _, state = _load(torch, path)
    tensors = {}
    for name, tensor in state.items():
        arr = _to_numpy(torch, path, name, tensor)
        check_numeric(path, name, arr.dtype)
        tensors[name] = arr
    return tensors


def write(template: pathlib.Path, tensors: Mapping[str, np.ndarray], out: pathlib.Path) -> None:
    """Save the template's checkpoint with its state-dict tensors replaced by ``tensors``."""
    torch = _import_torch("writing", out)
    checkpoint, _, state = _load(torch, template)
    specs = {
        name: (tuple(t.shape), _numpy_dtype(torch, template, name, t)) for name, t in state.items()
    }
    for name, arr in conform(template, specs, tensors).items():
        old = state[name]
        new = torch.from_numpy(np.array(arr, order="C")).to(old.dtype)
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        # Replace in place: keeps the state dict's type, order and _metadata (module versions
        # that load_state_dict uses), and the checkpoint's other entries.
        state[name] = new
    torch.save(checkpoint, out)


def _import_torch(action: str, path: pathlib.Path):
    try:
        import torch
    except ImportError as e:
        raise ModelFormatError(
            f"{action} {path.suffix.lower()} files needs PyTorch: pip install 'secagg[torch]'"
        ) from e
    return torch


def _load(torch, path: pathlib.Path):
    """Return (whole checkpoint, nesting key or None, the state dict inside it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a pickled Python object, typically a whole nn.Module
            raise ModelFormatError(
                f"{path}: holds a pickled {found.group(1)}, not just tensors; {_SAVE_STATE_DICT}"
            ) from e
        # torch's weights-only message advises weights_only=False, which is wrong advice here.
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in detail:
            detail = "unexpected pickle data"
        raise ModelFormatError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): {detail}; re-save "
            "it with torch.save(model.state_dict(), path)"
        ) from e
    if not isinstance(checkpoint, Mapping):
        raise ModelFormatError(
            f"{path}: holds a {type(checkpoint).__name__}, not a state dict; {_SAVE_STATE_DICT}"
        )
    key = next((k for k in _NESTING_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    state = checkpoint if key is None else checkpoint[key]
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ModelFormatError(
                f"{path}: entry {name!r} of the state dict is a {type(value).__name__}, not a "
                f"tensor; {_SAVE_STATE_DICT}"
            )
    return checkpoint, key, state


def _numpy_dtype(torch, path: pathlib.Path, name: str, tensor) -> np.dtype:
    """The dtype _to_numpy gives ``tensor``, without copying its data."""
    _check_dense_real(torch, path, name, tensor)
    return _to_numpy(torch, path, name, torch.empty(0, dtype=tensor.dtype)).dtype


def _check_dense_real(torch, path: pathlib.Path, name: str, tensor) -> None:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex():
        raise ModelFormatError(
            f"{path}: tensor {name!r} is {tensor.layout}/{tensor.dtype}; only dense real "
            "tensors are supported"
        )


def _to_numpy(torch, path: pathlib.Path, name: str, tensor) -> np.ndarray:
    _check_dense_real(torch, path, name, tensor)
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy().copy()  # copy: tensors may share storage (tied weights)
    except TypeError:
        if tensor.is_floating_point():  # bfloat16, float8: no numpy dtype
            return tensor.float().numpy()
        raise ModelFormatError(
            f"{path}: tensor {name!r} has dtype {tensor.dtype}, which numpy cannot hold"
        ) from None
