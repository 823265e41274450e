"""Local training for the merge methods that need it (fine-tune rounds, common init).

Only sites train, each on its own data, in its own framework: Keras models are trained with the
model file's own architecture (Adam, MSE); PyTorch state dicts that follow the convention of
``secagg.merge.network`` are trained as a :func:`~secagg.merge.network.make_torch_regressor`.
Also writes the pooled linear model as a Keras, PyTorch or npz file.
"""

from __future__ import annotations

import dataclasses

import os
from pathlib import Path

import numpy as np

from secagg.errors import ModelFormatError

BATCH_SIZE = 256
LEARNING_RATE = 1e-3


def family(path: Path) -> str:
    """'keras', 'torch' or 'npz' by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".keras", ".h5"):
        return "keras"
    if suffix in (".pt", ".pth"):
        return "torch"
    if suffix == ".npz":
        return "npz"
    raise ModelFormatError(f"{path}: merging needs a Keras (.keras/.h5) or PyTorch (.pt/.pth) model")


class Trainer:
    """Trains, re-initializes and rebuilds networks of one site's model file."""

    def __init__(self, model_path: str | Path, seed: int = 0) -> None:
        self.model_path = Path(model_path)
        self.family = family(self.model_path)
        self.seed = seed
        self._keras_model = None

    @staticmethod
    def rebuild(network):
        """A function: averaged tensors (with this site's names) -> a network like ``network``."""
        return network.with_tensors

    # -- Keras ----------------------------------------------------------------------------------

    def _keras(self):
        from secagg.models import keras_files

        keras = keras_files._import_keras("training", self.model_path)
        if self._keras_model is None:
            self._keras_model = keras_files._load(keras, self.model_path)
        return keras, self._keras_model, keras_files._named_variables(keras, self._keras_model)

    def _keras_set(self, network) -> None:
        keras, model, variables = self._keras()
        for name, value in network.to_tensors().items():
            variables[name].assign(np.asarray(value, dtype=variables[name].dtype))

    def _keras_get(self, network):
        keras, _, variables = self._keras()
        return network.with_tensors({n: np.asarray(keras.ops.convert_to_numpy(v)) for n, v in variables.items()})

    # -- PyTorch --------------------------------------------------------------------------------

    def _torch_module(self, network):
        import torch

        from secagg.merge.network import Recurrent, make_torch_regressor, network_from_tensors

        recurrent = [layer for layer in network.layers if isinstance(layer, Recurrent)]
        dense = [layer for layer in network.layers if not isinstance(layer, Recurrent)]
        module = make_torch_regressor(recurrent[0].input_dim, [r.units for r in recurrent],
                                      [d.output_dim for d in dense], recurrent[0].kind)
        own = network_from_tensors({k: v.numpy() for k, v in module.state_dict().items()}, "torch")
        return torch, module, own

    def _torch_set(self, network):
        torch, module, own = self._torch_module(network)
        for i, layer in enumerate(network.layers):
            own = own.replace(i, layer)
        module.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in own.to_tensors().items()})
        return torch, module, own

    @staticmethod
    def _torch_get(network, module, own):
        trained = own.with_tensors({k: v.detach().numpy() for k, v in module.state_dict().items()})
        out = network
        for i, layer in enumerate(trained.layers):
            out = out.replace(i, layer)
        return out

    # -- public ---------------------------------------------------------------------------------

    def train(self, network, x: np.ndarray, y: np.ndarray, epochs: int, round_index: int = 0):
        """``network`` trained ``epochs`` epochs on (x, y); returns a network like it."""
        if self.family == "keras":
            keras, model, _ = self._keras()
            keras.utils.set_random_seed(self.seed * 1000 + round_index)
            self._keras_set(network)
            model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
            model.fit(x.astype(np.float32), y.astype(np.float32), epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
            return self._keras_get(network)
        if self.family == "torch":
            torch, module, own = self._torch_set(network)
            torch.manual_seed(self.seed * 1000 + round_index)
            opt = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
            xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
            for _ in range(epochs):
                order = torch.randperm(len(xt))
                for s in range(0, len(xt), BATCH_SIZE):
                    idx = order[s : s + BATCH_SIZE]
                    opt.zero_grad()
                    loss = torch.nn.functional.mse_loss(module(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
            return self._torch_get(network, module, own)
        raise ModelFormatError("training needs a Keras or PyTorch model file")

    def fisher(self, network, x: np.ndarray, y: np.ndarray, batch_size: int = 32, max_batches: int = 64) -> dict:
        """Diagonal empirical Fisher of the MSE loss per tensor name: the mean squared mini-batch gradient."""
        idx = np.linspace(0, len(x) - 1, min(len(x), batch_size * max_batches)).astype(int)
        batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
        if self.family == "keras":
            import tensorflow as tf

            keras, model, variables = self._keras()
            self._keras_set(network)
            names, tvars = list(variables), list(variables.values())
            sums = [np.zeros(v.shape) for v in tvars]
            for b in batches:
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((model(x[b].astype(np.float32), training=False) - y[b].astype(np.float32)) ** 2)
                for s, g in zip(sums, tape.gradient(loss, tvars)):
                    s += np.zeros(s.shape) if g is None else np.asarray(g) ** 2
            return {n: s / len(batches) for n, s in zip(names, sums)}
        if self.family == "torch":
            torch, module, own = self._torch_set(network)
            sums = {k: np.zeros(tuple(p.shape)) for k, p in module.named_parameters()}
            for b in batches:
                module.zero_grad()
                out = module(torch.as_tensor(x[b], dtype=torch.float32))
                torch.nn.functional.mse_loss(out, torch.as_tensor(y[b], dtype=torch.float32)).backward()
                for k, p in module.named_parameters():
                    sums[k] += p.grad.detach().numpy().astype(np.float64) ** 2
            fisher_net = own.with_tensors({k: v / len(batches) for k, v in sums.items()})
            out_net = network
            for i, layer in enumerate(fisher_net.layers):
                out_net = out_net.replace(i, layer)
            return out_net.to_tensors()
        raise ModelFormatError("the Fisher information needs a Keras or PyTorch model file")

    def reinit(self, network, seed: int):
        """A fresh initialization of ``network``'s architecture, the same at every site for one ``seed``."""
        return seeded_init(network, seed)


def seeded_init(network, seed: int):
    """A fresh initialization drawn in numpy from ``seed`` alone: identical at every site.

    Keras's own initializers, seeded with ``keras.utils.set_random_seed``, gave *different* values
    at different sites for the same seed (their random state depends on the model loaded before),
    and averaging those "common" starts shrank them toward zero. The distributions are Keras's
    defaults: Glorot-uniform input kernels, orthogonal recurrent kernels, zero biases with the LSTM
    forget gate at 1 (unit_forget_bias).
    """
    from secagg.merge.network import Dense, Recurrent

    rng = np.random.default_rng(seed)

    def glorot(shape):
        limit = np.sqrt(6.0 / (shape[0] + shape[1]))
        return rng.uniform(-limit, limit, size=shape)

    def orthogonal(units, cols):
        q, r = np.linalg.qr(rng.standard_normal((cols, units)))
        return (q * np.sign(np.diag(r))).T  # (units, cols), orthonormal rows

    fresh = network
    for i, layer in enumerate(network.layers):
        if isinstance(layer, Recurrent):
            units = layer.recurrent_kernel.shape[0]
            bias = np.zeros_like(layer.bias, dtype=np.float64)
            if layer.kind == "lstm":
                f = layer.gate_order.index("f")
                bias[..., f * units : (f + 1) * units] = 1.0
            new = dataclasses.replace(
                layer, kernel=glorot(layer.kernel.shape), recurrent_kernel=orthogonal(units, layer.recurrent_kernel.shape[1]),
                bias=bias, recurrent_bias=None if layer.recurrent_bias is None else np.zeros_like(layer.recurrent_bias))
        elif isinstance(layer, Dense):
            new = dataclasses.replace(layer, kernel=glorot(layer.kernel.shape),
                                      bias=None if layer.bias is None else np.zeros_like(layer.bias))
        else:
            raise ModelFormatError(f"cannot initialize layer {i} ({type(layer).__name__})")
        fresh = fresh.replace(i, new)
    return fresh


def write_linear(template: Path, kernel: np.ndarray, bias: np.ndarray, input_shape: tuple, out: str | Path) -> Path:
    """Write the pooled linear model y = flatten(x) @ kernel + bias in the template's framework.

    Keras: Input -> Flatten -> Dense. PyTorch: a state dict ``{"linear.weight", "linear.bias"}`` for
    ``nn.Sequential(nn.Flatten(), nn.Linear(...))`` named ``linear`` (load it into
    ``torch.nn.Sequential(OrderedDict(flatten=nn.Flatten(), linear=nn.Linear(d, out)))``). npz: kernel, bias.
    """
    out = Path(out)
    fam = family(template)
    if family(out) != fam:
        raise ModelFormatError(f"{out}: write the linear model in the sites' format ({Path(template).suffix})")
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix.lower()}")
    try:
        if fam == "keras":
            from secagg.models import keras_files

            keras = keras_files._import_keras("writing", out)
            model = keras.Sequential([keras.Input(shape=tuple(int(d) for d in input_shape)), keras.layers.Flatten(name="flatten"),
                                      keras.layers.Dense(kernel.shape[1], name="linear")], name="pooled_linear")
            model.get_layer("linear").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
            model.save(str(tmp))
        elif fam == "torch":
            import torch

            torch.save({"linear.weight": torch.as_tensor(kernel.T.astype(np.float32)),
                        "linear.bias": torch.as_tensor(bias.astype(np.float32))}, tmp)
        else:
            np.savez(tmp, kernel=kernel, bias=bias)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
