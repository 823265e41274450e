"""Writing the models of :mod:`secagg.merge.heads` as ordinary model files of the sites' framework.

A file written here loads and predicts with the framework alone:

* Keras, linear: ``Input -> Flatten -> Dense`` (a Sequential model named ``pooled_linear``).
* Keras, hybrid: a functional model ``hybrid``: the sites' model (output layer refit) applied to the
  input, plus ``Flatten -> Dense(no bias)`` named ``skip``, added (layer ``hybrid_sum``).
  ``keras.models.load_model(path)`` gives it back.
* PyTorch, linear: a state dict ``{"linear.weight", "linear.bias"}`` for
  ``nn.Sequential(OrderedDict(flatten=nn.Flatten(), linear=nn.Linear(d, out)))``.
* PyTorch, hybrid: a state dict with the sites' module under ``base.`` and ``skip.weight``, for
  the five-line module of :func:`torch_hybrid_class` (``HybridForecaster(base, d, out)``, its
  forward ``base(x) + skip(x.flatten(1))``), which the user may copy instead of importing secagg.
* npz: the arrays (linear: ``kernel``, ``bias``).

Files are written to a temporary name and renamed, so a failed write leaves nothing half-written.
"""

from __future__ import annotations

import functools
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

from secagg.errors import ModelFormatError
from secagg.merge.heads import HybridModel, LinearModel
from secagg.merge.training import family
from secagg.models import write_model


def write_head_model(template: Path, model: HybridModel | LinearModel, input_shape: tuple, out: str | Path) -> Path:
    """Write ``model`` at ``out``, in the framework of the sites' model file ``template``."""
    out = Path(out)
    fam = family(template)
    if family(out) != fam:
        raise ModelFormatError(f"{out}: write the global model in the sites' format ({Path(template).suffix})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{secrets.token_hex(4)}.tmp{out.suffix.lower()}")
    try:
        if isinstance(model, LinearModel):
            _write_linear(fam, model, input_shape, tmp)
        else:
            _write_hybrid(fam, Path(template), model, input_shape, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_linear(fam: str, model: LinearModel, input_shape: tuple, tmp: Path) -> None:
    kernel, bias = model.kernel, np.asarray(model.bias).reshape(-1)
    if fam == "keras":
        from secagg.models import keras_files

        keras = keras_files._import_keras("writing", tmp)
        net = keras.Sequential([keras.Input(shape=tuple(int(d) for d in input_shape)), keras.layers.Flatten(name="flatten"),
                                keras.layers.Dense(kernel.shape[1], name="linear")], name="pooled_linear")
        net.get_layer("linear").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        net.save(str(tmp))
    elif fam == "torch":
        import torch

        torch.save({"linear.weight": torch.as_tensor(kernel.T.astype(np.float32)),
                    "linear.bias": torch.as_tensor(bias.astype(np.float32))}, tmp)
    else:
        np.savez(tmp, kernel=kernel, bias=bias)


def _write_hybrid(fam: str, template: Path, model: HybridModel, input_shape: tuple, tmp: Path) -> None:
    if fam not in ("keras", "torch"):
        raise ModelFormatError("a hybrid model is written as a Keras or PyTorch file; these sites' models are "
                               f"{template.suffix} files: merge with --same-architecture or the linear method")
    with tempfile.TemporaryDirectory(prefix="secagg-hybrid-") as scratch:
        base_file = write_model(template, model.base.to_tensors(), Path(scratch) / f"base{template.suffix.lower()}")
        if fam == "keras":
            from secagg.models import keras_files

            keras = keras_files._import_keras("writing", tmp)
            base = keras.models.load_model(base_file, compile=False)
            inp = keras.Input(shape=tuple(int(d) for d in input_shape), name="window")
            skip = keras.layers.Dense(model.skip.shape[1], use_bias=False, name="skip")
            summed = keras.layers.Add(name="hybrid_sum")([base(inp), skip(keras.layers.Flatten(name="flatten")(inp))])
            net = keras.Model(inp, summed, name="hybrid")
            skip.set_weights([model.skip.astype(np.float32)])
            net.save(str(tmp))
        else:
            import torch

            state = torch.load(base_file, map_location="cpu", weights_only=True)
            if not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ModelFormatError(f"{template}: a hybrid model needs a plain state dict as the sites' model file")
            hybrid = {f"base.{k}": v for k, v in state.items()}
            hybrid["skip.weight"] = torch.as_tensor(model.skip.T.astype(np.float32))
            torch.save(hybrid, tmp)


@functools.cache
def torch_hybrid_class() -> type:
    """``HybridForecaster(base, inputs, outputs)``: loads the state dict of a PyTorch hybrid model.

    ``base`` is the sites' own ``nn.Module`` (constructed as usual), ``inputs`` the number of values
    in one input window (window x features), ``outputs`` the model's outputs per window.
    """
    import torch

    class HybridForecaster(torch.nn.Module):
        """The sites' network plus a linear skip from the flattened input window."""

        def __init__(self, base: torch.nn.Module, inputs: int, outputs: int) -> None:
            super().__init__()
            self.base = base
            self.skip = torch.nn.Linear(inputs, outputs, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.skip(x.flatten(1))

    return HybridForecaster


#: Windows of the site's data a written Keras head model is checked on.
CHECK_WINDOWS = 256


def check_written(path: Path, model: HybridModel | LinearModel, x: np.ndarray) -> float:
    """Load a written Keras file with Keras and compare its predictions with ``model``'s on ``x``.

    Returns the largest difference; raises :class:`~secagg.merge.network.ForwardMismatchError`
    (and removes the file) when they differ by more than float32 rounding explains. PyTorch and npz
    files are not reloaded here: their base network passed the framework check before release, and
    the skip or linear layer is a plain matrix product.
    """
    from secagg.merge.network import ForwardMismatchError

    if family(path) != "keras":
        return 0.0
    from secagg.models import keras_files

    keras = keras_files._import_keras("checking", path)
    x = np.asarray(x, dtype=np.float64)
    x = x[np.unique(np.linspace(0, len(x) - 1, min(CHECK_WINDOWS, len(x))).astype(int))]
    want = np.asarray(keras.models.load_model(path, compile=False).predict(x.astype(np.float32), verbose=0),
                      dtype=np.float64).reshape(len(x), -1)
    got = model.forward(x)
    diff = float(np.max(np.abs(got - want), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if not diff <= 1e-4 * scale:
        Path(path).unlink(missing_ok=True)
        raise ForwardMismatchError(f"{path}: Keras's predictions of the written model differ from secagg's by up to "
                                   f"{diff:.3g} (tolerance {1e-4 * scale:.2g}); the file was removed")
    return diff
