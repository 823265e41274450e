"""Keras 3 model files: ``.keras`` (native) and ``.h5`` (legacy HDF5).

Tensor names are the variables' paths relative to the model, e.g. ``lstm/lstm_cell/kernel``,
in ``model.weights`` order (trainable and non-trainable, e.g. BatchNormalization moving
statistics). Keras's own ``variable.path`` is not stable: it carries the model's name (which
depends on how many models the session built) and nested layers lose their outer scopes when a
file is reloaded, differently for ``.keras`` and ``.h5``. So names are rebuilt from the layer
tree: enclosing model names, then the owning layer's name, then the variable path below it.
The same model therefore gets the same names from both file types.

Keras numbers the layers of every model built in one session (``lstm``, ``lstm_1``, ...), so
identical models often have different names; secagg matches tensors by position and layer type
(:mod:`secagg.packing`). Each tensor's layer type is the owning layer's class name, with the inner
layer's for wrappers: ``LSTM``, ``Dense``, ``Bidirectional/LSTM``, ``TimeDistributed/Dense``.

Models are loaded with ``compile=False``: the written file has the template's architecture and
the new weights, but no optimizer state or training config.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from secagg.errors import ModelFormatError
from secagg.models import check_numeric, conform
from secagg.packing import ModelTensors


def read(path: pathlib.Path) -> ModelTensors:
    """Return the model's weights by name in ``model.weights`` order, with their layer types."""
    keras = _import_keras("reading", path)
    model = _load(keras, path)
    layer_types: dict[str, str] = {}
    tensors = {}
    for name, variable in _named_variables(keras, model, layer_types).items():
        arr = np.asarray(keras.ops.convert_to_numpy(variable))
        if _numpy_dtype(arr.dtype) != arr.dtype:
            arr = arr.astype(np.float32)  # e.g. bfloat16 variables; cast back on write
        check_numeric(path, name, arr.dtype)
        tensors[name] = arr
    return ModelTensors(tensors, layer_types)


def write(template: pathlib.Path, tensors: Mapping[str, np.ndarray] | Sequence[np.ndarray], out: pathlib.Path) -> None:
    """Load ``template``, assign ``tensors`` (by name, or by position: see ``conform``), and save the model at ``out``."""
    keras = _import_keras("writing", out)
    model = _load(keras, template)
    layer_types: dict[str, str] = {}
    variables = _named_variables(keras, model, layer_types)
    specs = {name: (tuple(v.shape), _variable_dtype(keras, v)) for name, v in variables.items()}
    for name, arr in conform(template, specs, tensors, layer_types).items():
        variables[name].assign(arr)  # Keras casts to the variable's own dtype (e.g. bfloat16)
    try:
        with warnings.catch_warnings():
            # Keras's HDF5 writer trips a numpy 2 deprecation warning on every weight.
            warnings.filterwarnings("ignore", message=r".*__array__ implementation")
            # Suffix .h5 selects Keras 3's legacy HDF5 writer, .keras the native format.
            model.save(str(out))
    except Exception as e:
        raise ModelFormatError(
            # `out` is write_model's temporary name, so name the template instead.
            f"Keras could not save a model like {template} as a {out.suffix} file ({e}); try "
            f"the template's suffix {template.suffix}"
        ) from e


def _import_keras(action: str, path: pathlib.Path):
    try:
        keras = _quiet_import_keras()
    except ImportError as e:
        raise ModelFormatError(
            f"{action} {path.suffix.lower()} files needs TensorFlow/Keras: "
            "pip install 'secagg[keras]'"
        ) from e
    return keras


def _load(keras, path: pathlib.Path):
    suffix = path.suffix.lower()
    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix != suffix:
            # Keras dispatches on the exact, lower-case suffix; give it a copy named so.
            path_for_keras = pathlib.Path(tmp) / f"model{suffix}"
            shutil.copyfile(path, path_for_keras)
        else:
            path_for_keras = path
        try:
            return keras.models.load_model(path_for_keras, compile=False)
        except Exception as e:
            raise _load_error(path, e) from e


def _load_error(path: pathlib.Path, error: Exception) -> ModelFormatError:
    text = str(error)
    if "safe_mode" in text:
        why = (
            "it contains a Lambda layer with Python code, which Keras refuses to load for "
            "safety; replace the Lambda with a registered custom layer"
        )
    elif any(s in text for s in ("Unknown layer", "Could not locate", "could not be deserial")):
        why = (
            "it uses custom layers or objects Keras cannot find; import the module that defines "
            "them (decorated with @keras.saving.register_keras_serializable()) before secagg "
            "reads the file"
        )
    else:
        why = f"not a readable Keras {path.suffix} model (corrupt or truncated?)"
    detail = text.splitlines()[0] if text else type(error).__name__
    return ModelFormatError(f"{path}: {why}. Keras said: {detail}")


def _named_variables(keras, model, layer_types: dict[str, str] | None = None) -> dict:
    """Map unique, stable names to the model's variables, in ``model.weights`` order.

    ``layer_types``, if given, receives each name's layer type ("" where no layer owns it).
    """
    structural: dict[int, tuple[str, str]] = {}
    _walk(keras, model, [model.name], structural)
    named = {}
    for variable in model.weights:
        base, layer_type = structural.get(id(variable)) or (_relative_path(variable.path, [model.name]), "")
        name, n = base, 0
        while name in named:  # two variables with one path: number them in model order
            n += 1
            name = f"{base}:{n}"
        named[name] = variable
        if layer_types is not None:
            layer_types[name] = layer_type
    return named


def _walk(keras, model, ancestors: list[str], names: dict[int, tuple[str, str]]) -> None:
    prefix = "".join(a + "/" for a in ancestors[1:])  # the top-level model's name is dropped
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _walk(keras, layer, ancestors + [layer.name], names)
            continue
        layer_type = _layer_type(keras, layer)
        for variable in layer.weights:
            segments = variable.path.split("/")
            if layer.name in segments[:-1]:
                rel = "/".join(segments[segments.index(layer.name):])
            else:  # built outside the layer's scope (happens after reloading)
                rel = layer.name + "/" + _relative_path(variable.path, ancestors)
            names.setdefault(id(variable), (prefix + rel, layer_type))  # shared variables: first owner wins


def _layer_type(keras, layer) -> str:
    """The layer's class name; a wrapper's followed by its inner layer's: ``Bidirectional/LSTM``."""
    inner = getattr(layer, "forward_layer", None) or getattr(layer, "layer", None)  # Bidirectional, Wrapper
    own = type(layer).__name__
    return f"{own}/{_layer_type(keras, inner)}" if isinstance(inner, keras.layers.Layer) else own


def _relative_path(path: str, ancestors: list[str]) -> str:
    segments = path.split("/")
    while len(segments) > 1 and segments[0] in ancestors:
        segments.pop(0)
    return "/".join(segments)


def _variable_dtype(keras, variable) -> np.dtype:
    try:
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    except TypeError:  # a name plain numpy does not know, e.g. "bfloat16"
        return np.dtype(np.float32)
    return _numpy_dtype(dtype)


def _numpy_dtype(dtype: np.dtype) -> np.dtype:
    """float32 stands in for float types plain numpy lacks (bfloat16, float8 via ml_dtypes)."""
    return dtype if dtype.kind in "biuf" else np.dtype(np.float32)


def _quiet_import_keras():
    """Import keras with TensorFlow's C++ start-up chatter (absl, oneDNN) kept off stderr.

    Those lines go straight to file descriptor 2, around Python's logging, and would break the
    CLI's one-line error contract. What was written is replayed if the import fails.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import keras
        except ImportError:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return keras

