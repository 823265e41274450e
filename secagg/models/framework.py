"""The user's model in its own framework: the judge of every forward pass secagg computes.

secagg's merge methods work on a numpy view of a network (:mod:`secagg.merge.network`). Whatever
that view computes is checked against the framework's own forward pass before a model is scored
or released, and commands that only need to run a model (``diagnose``, ``predict``) run it here,
in Keras or PyTorch, never through the numpy view.

A Keras file records its architecture and activations, so it is enough on its own. A PyTorch
state dict records neither the forward pass nor the activations, so a PyTorch model also needs
the user's ``nn.Module``: ``torch_module`` is a module instance, a zero-argument callable that
returns one, or a string ``"package.module:Name"`` / ``"path/to/file.py:Name"`` naming a class or
factory (called with ``torch_kwargs``). secagg never guesses a PyTorch forward pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError

TorchModuleLike = Any  # str "module:Name", an nn.Module, or a callable returning one

TORCH_MODULE_HELP = (
    "give the model's nn.Module: --torch-model package.module:Class (or path/to/file.py:Class; a class or "
    "function that builds the module, called with --torch-kwargs JSON)"
)


def load_torch_module(spec: TorchModuleLike, kwargs: Mapping[str, Any] | str | None = None):
    """An ``nn.Module`` from ``spec`` (see the module docstring). ``kwargs`` may be a JSON object string."""
    try:
        import torch
    except ImportError as e:
        raise ModelFormatError("PyTorch models need PyTorch: pip install 'secagg[torch]'") from e
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except ValueError as e:
            raise ModelFormatError(f"--torch-kwargs must be a JSON object, e.g. '{{\"units\": 32}}' ({e})") from e
        if not isinstance(kwargs, dict):
            raise ModelFormatError("--torch-kwargs must be a JSON object, e.g. '{\"units\": 32}'")
    kwargs = dict(kwargs or {})
    if isinstance(spec, torch.nn.Module):
        if kwargs:
            raise ModelFormatError("torch_kwargs apply to a class or factory, not to a module instance")
        return spec
    factory = _resolve(spec) if isinstance(spec, str) else spec
    if not callable(factory):
        raise ModelFormatError(f"torch module {spec!r} is neither an nn.Module nor callable; {TORCH_MODULE_HELP}")
    try:
        module = factory(**kwargs)
    except TypeError as e:
        raise ModelFormatError(f"could not build the torch module {spec!r} with arguments {kwargs}: {e}; pass its "
                               "constructor arguments with --torch-kwargs JSON") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelFormatError(f"{spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _resolve(spec: str) -> Callable:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ModelFormatError(f"torch module {spec!r} is not of the form package.module:Name or file.py:Name")
    if where.endswith(".py") or os.sep in where:
        path = pathlib.Path(where)
        if not path.is_file():
            raise ModelFormatError(f"torch module file {where} does not exist")
        mod_name = f"_secagg_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look their module up here
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise ModelFormatError(f"importing {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelFormatError(f"cannot import {where!r} for --torch-model: {e}; is it on PYTHONPATH?") from e
    try:
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ModelFormatError(f"{where} has no {name!r} (from --torch-model {spec})") from None
    return obj


class FrameworkModel:
    """A model file loaded in its framework, whose weights can be replaced and which predicts.

    ``tensors()`` and ``set_tensors()`` use the names :func:`secagg.models.read_model` gives the
    same file, so a merged model's tensors can be run as the framework runs them.
    """

    def __init__(self, framework: str, model: Any, names: dict[str, Any], path: pathlib.Path) -> None:
        self.framework = framework
        self.model = model
        self._named = names  # name -> keras variable or torch tensor (in the module's state dict)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, torch_module: TorchModuleLike = None,
             torch_kwargs: Mapping[str, Any] | str | None = None) -> "FrameworkModel":
        path = pathlib.Path(path)
        suffix = path.suffix.lower()
        if suffix in (".keras", ".h5"):
            from secagg.models import keras_files

            if not path.is_file():
                raise ModelFormatError(f"{path}: no such model file")
            keras = keras_files._import_keras("running", path)
            model = keras_files._load(keras, path)
            return cls("keras", model, keras_files._named_variables(keras, model), path)
        if suffix in (".pt", ".pth"):
            from secagg.models import read_model

            if torch_module is None:
                raise ModelFormatError(
                    f"{path}: a PyTorch state dict records neither the forward pass nor the activations, so secagg "
                    f"will not guess them; {TORCH_MODULE_HELP}")
            import torch

            tensors = read_model(path)
            module = load_torch_module(torch_module, torch_kwargs)
            if "skip.weight" in tensors and all(k == "skip.weight" or k.startswith("base.") for k in tensors):
                # A hybrid global model (secagg.merge.head_files): the sites' module plus a linear skip.
                from secagg.merge.head_files import torch_hybrid_class

                outputs, inputs = tensors["skip.weight"].shape
                module = torch_hybrid_class()(module, inputs, outputs)
            own = module.state_dict()
            _check_same_layout(path, list(tensors), list(own), {k: tuple(v.shape) for k, v in tensors.items()},
                               {k: tuple(v.shape) for k, v in own.items()})
            # The file's names may differ from the module's (renamed attributes): match by position.
            renamed = {mk: torch.as_tensor(np.asarray(v)).to(own[mk].dtype) for mk, v in zip(own, tensors.values())}
            module.load_state_dict(renamed)
            module.eval()
            state = module.state_dict(keep_vars=True)
            named = {fk: state[mk] for fk, mk in zip(tensors, own)}
            return cls("torch", module, named, path)
        raise ModelFormatError(f"{path}: running a model needs a Keras (.keras/.h5) or PyTorch (.pt/.pth) file")

    def tensors(self) -> dict[str, np.ndarray]:
        """The current weights by file name."""
        if self.framework == "keras":
            import keras

            return {n: np.asarray(keras.ops.convert_to_numpy(v)) for n, v in self._named.items()}
        return {n: v.detach().cpu().numpy().copy() for n, v in self._named.items()}

    def set_tensors(self, tensors: Mapping[str, np.ndarray]) -> "FrameworkModel":
        """Assign weights by position in the file's order (names are labels); returns self."""
        values = list(tensors.values())
        if len(values) != len(self._named):
            raise ModelFormatError(f"{len(values)} tensors given for a model of {len(self._named)} ({self.path})")
        for (name, var), value in zip(self._named.items(), values):
            value = np.asarray(value)
            if tuple(var.shape) != value.shape:
                raise ModelFormatError(f"tensor {name!r} of {self.path} has shape {tuple(var.shape)}, "
                                       f"got {value.shape}")
            if self.framework == "keras":
                var.assign(value)  # Keras casts to the variable's own dtype
            else:
                import torch

                with torch.no_grad():
                    var.copy_(torch.as_tensor(np.array(value, order="C")).to(var.dtype))
        if self.framework == "keras":
            import keras

            # Keras's Normalization computes from copies of its statistics made when they were last
            # set ("finalized"); without this it would go on using the old ones.
            for layer in flat_keras_layers(keras, self.model):
                if hasattr(layer, "finalize_state") and isinstance(layer, keras.layers.Normalization):
                    layer.finalize_state()
        return self

    def predict(self, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """The framework's own inference output for ``x`` (float64, the framework's output shape)."""
        x = np.asarray(x, dtype=np.float32)
        if self.framework == "keras":
            parts = [np.asarray(self.model(x[i:i + batch_size], training=False), dtype=np.float64)
                     for i in range(0, len(x), batch_size)]
        else:
            import torch

            self.model.eval()
            with torch.no_grad():
                parts = [_torch_output(self.model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))))
                         for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0,))

    def features(self, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """The input of the model's last Dense/Linear layer for ``x`` (for refitting the readout).

        A hybrid global model's head is its base network's output layer and its skip together: its
        features are the base's last features followed by the flattened input window.
        """
        x = np.asarray(x, dtype=np.float32)
        if self._is_hybrid():
            return np.concatenate([self._hybrid_base().features(x, batch_size),
                                   np.asarray(x, np.float64).reshape(len(x), -1)], axis=1)
        if self.framework == "keras":
            import keras

            last = [layer for layer in flat_keras_layers(keras, self.model) if layer.weights][-1]
            inputs = self.model.inputs
            # One input as a tensor, not a list of one: Keras warns when the call's structure differs.
            sub = keras.Model(inputs[0] if len(inputs) == 1 else inputs, last.input)
            parts = [np.asarray(sub(x[i:i + batch_size], training=False), dtype=np.float64)
                     for i in range(0, len(x), batch_size)]
            return np.concatenate(parts)
        import torch

        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ModelFormatError(f"{self.path}: the module has no nn.Linear layer to refit")
        seen: list = []
        handle = linears[-1].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
        try:
            self.predict(x, batch_size)
        finally:
            handle.remove()
        return np.concatenate([s.numpy().astype(np.float64) for s in seen])

    def readout(self) -> tuple[np.ndarray, np.ndarray]:
        """The last Dense/Linear layer's ``(kernel (features, outputs), bias (outputs,))``, the map
        applied to :meth:`features` (Keras' kernel layout; a torch weight is transposed)."""
        if self._is_hybrid():
            kernel, bias = self._hybrid_base().readout()
            return np.vstack([kernel, self._skip_kernel()]), bias
        kernel, bias = self._readout_variables()
        if self.framework == "keras":
            import keras

            return (np.asarray(keras.ops.convert_to_numpy(kernel), np.float64),
                    np.asarray(keras.ops.convert_to_numpy(bias), np.float64))
        return kernel.detach().cpu().numpy().T.astype(np.float64), bias.detach().cpu().numpy().astype(np.float64)

    def set_readout(self, kernel: np.ndarray, bias: np.ndarray) -> "FrameworkModel":
        """Replace the last Dense/Linear layer's weights (layout of :meth:`readout`); returns self."""
        if self._is_hybrid():
            base = self._hybrid_base()
            rows = base.readout()[0].shape[0]
            skip = np.asarray(kernel)[rows:]
            if skip.shape != self._skip_kernel().shape:
                raise ModelFormatError(f"{self.path}: the hybrid's skip is {self._skip_kernel().shape}, got {skip.shape}")
            base.set_readout(np.asarray(kernel)[:rows], bias)
            self._set_skip_kernel(skip)
            return self
        kernel_var, bias_var = self._readout_variables()
        kernel, bias = np.asarray(kernel), np.asarray(bias)
        if self.framework == "torch":
            kernel = kernel.T
        if kernel.shape != tuple(kernel_var.shape) or bias.shape != tuple(bias_var.shape):
            raise ModelFormatError(f"{self.path}: the readout is {tuple(kernel_var.shape)} and "
                                   f"{tuple(bias_var.shape)}, got {kernel.shape} and {bias.shape}")
        if self.framework == "keras":
            kernel_var.assign(kernel)
            bias_var.assign(bias)
        else:
            import torch

            with torch.no_grad():
                kernel_var.copy_(torch.as_tensor(np.ascontiguousarray(kernel)).to(kernel_var.dtype))
                bias_var.copy_(torch.as_tensor(np.ascontiguousarray(bias)).to(bias_var.dtype))
        return self

    def _readout_variables(self):
        if self.framework == "keras":
            import keras

            last = [layer for layer in flat_keras_layers(keras, self.model) if layer.weights][-1]
            dense = last.layer if isinstance(last, keras.layers.TimeDistributed) else last
            if not isinstance(dense, keras.layers.Dense) or dense.bias is None:
                raise ModelFormatError(f"{self.path}: the last layer with weights ({last.name}, "
                                       f"{type(last).__name__}) is not a Dense layer with a bias; only a Dense "
                                       "readout can be refit")
            if dense.activation not in (None, keras.activations.linear):
                raise ModelFormatError(f"{self.path}: the last Dense layer ({last.name}) has a "
                                       f"{getattr(dense.activation, '__name__', dense.activation)} activation; only "
                                       "a linear readout can be refit in closed form")
            return dense.kernel, dense.bias
        import torch

        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears or linears[-1].bias is None:
            raise ModelFormatError(f"{self.path}: the module has no nn.Linear layer with a bias to refit")
        return linears[-1].weight, linears[-1].bias

    def _hybrid_base(self) -> "FrameworkModel":
        """The base network of a hybrid global model, as a FrameworkModel sharing its variables."""
        if self.framework == "keras":
            import keras

            base = next(layer for layer in self.model.layers if isinstance(layer, keras.Model))
        else:
            base = self.model.base
        return FrameworkModel(self.framework, base, {}, self.path)

    def _skip_kernel(self) -> np.ndarray:
        """The hybrid's skip as (window x features, outputs)."""
        if self.framework == "keras":
            import keras

            return np.asarray(keras.ops.convert_to_numpy(self.model.get_layer("skip").kernel), np.float64)
        return self.model.skip.weight.detach().cpu().numpy().T.astype(np.float64)

    def _set_skip_kernel(self, kernel: np.ndarray) -> None:
        if self.framework == "keras":
            self.model.get_layer("skip").kernel.assign(kernel)
        else:
            import torch

            with torch.no_grad():
                self.model.skip.weight.copy_(torch.as_tensor(np.ascontiguousarray(kernel.T)).to(self.model.skip.weight.dtype))

    def _is_hybrid(self) -> bool:
        """Whether this is a hybrid global model written by secagg.merge.head_files."""
        if self.framework == "keras":
            return self.model.name == "hybrid" and any(layer.name == "hybrid_sum" for layer in self.model.layers)
        return hasattr(self.model, "skip") and hasattr(self.model, "base")


def _torch_output(out) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().cpu().numpy().astype(np.float64)


def flat_keras_layers(keras, model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(flat_keras_layers(keras, layer))
        else:
            out.append(layer)
    return out


def _check_same_layout(path, file_names, module_names, file_shapes, module_shapes) -> None:
    """The file's state dict and the module's must agree by position in shape (names may differ)."""
    if len(file_names) != len(module_names):
        raise ModelFormatError(
            f"{path} holds {len(file_names)} tensors but the given torch module has {len(module_names)} "
            f"({', '.join(module_names[:6])}{'...' if len(module_names) > 6 else ''}); give the module the file was "
            "saved from")
    for i, (fn, mn) in enumerate(zip(file_names, module_names)):
        if file_shapes[fn] != module_shapes[mn]:
            raise ModelFormatError(
                f"{path}: tensor {i} is {fn!r} {file_shapes[fn]} in the file but {mn!r} {module_shapes[mn]} in the "
                "given torch module; give the module the file was saved from (and its --torch-kwargs)")
