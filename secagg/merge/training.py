"""Local training for the merge methods that need it (fine-tune rounds, common init).

Only sites train, each on its own data, in its own framework, on the model the site gave: the
Keras model file's own architecture, or the site's own ``nn.Module`` for a PyTorch state dict
(Adam, MSE).
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
    """Trains and re-initializes networks of one site's model, in the site's framework.

    ``framework`` is the site's :class:`secagg.models.framework.FrameworkModel`: the Keras model
    loaded from its file, or the site's ``nn.Module`` holding its state dict.
    """

    def __init__(self, framework, seed: int = 0) -> None:
        self.fm = framework
        self.family = framework.framework
        self.seed = seed

    @staticmethod
    def rebuild(network):
        """A function: averaged tensors (with this site's names) -> a network like ``network``."""
        return network.with_tensors

    def _load(self, network) -> None:
        self.fm.set_tensors(network.to_tensors())

    def _read(self, network):
        return network.with_tensors(self.fm.tensors())

    # -- public ---------------------------------------------------------------------------------

    def train(self, network, x: np.ndarray, y: np.ndarray, epochs: int, round_index: int = 0):
        """``network`` trained ``epochs`` epochs on (x, y); returns a network like it."""
        self._load(network)
        model = self.fm.model
        y = y.reshape(len(y), -1)
        if self.family == "keras":
            import keras

            keras.utils.set_random_seed(self.seed * 1000 + round_index)
            model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
            out_shape = tuple(int(d) for d in model.outputs[0].shape[1:])
            model.fit(x.astype(np.float32), y.astype(np.float32).reshape(len(y), *out_shape), epochs=epochs,
                      batch_size=BATCH_SIZE, verbose=0)
            return self._read(network)
        import torch

        torch.manual_seed(self.seed * 1000 + round_index)
        opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt))
            for s in range(0, len(xt), BATCH_SIZE):
                idx = order[s : s + BATCH_SIZE]
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(xt[idx]).reshape(len(idx), -1), yt[idx])
                loss.backward()
                opt.step()
        model.eval()
        return self._read(network)

    def fisher(self, network, x: np.ndarray, y: np.ndarray, batch_size: int = 32, max_batches: int = 64) -> dict:
        """Diagonal empirical Fisher of the MSE loss per tensor name: the mean squared mini-batch gradient."""
        idx = np.linspace(0, len(x) - 1, min(len(x), batch_size * max_batches)).astype(int)
        batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
        y = y.reshape(len(y), -1)
        self._load(network)
        names, variables = list(self.fm._named), list(self.fm._named.values())
        sums = [np.zeros(tuple(v.shape)) for v in variables]
        model = self.fm.model
        if self.family == "keras":
            import tensorflow as tf

            for b in batches:
                with tf.GradientTape() as tape:
                    out = tf.reshape(model(x[b].astype(np.float32), training=False), (len(b), -1))
                    loss = tf.reduce_mean((out - y[b].astype(np.float32)) ** 2)
                for s, g in zip(sums, tape.gradient(loss, variables)):
                    s += 0.0 if g is None else np.asarray(g) ** 2
        else:
            import torch

            for b in batches:
                model.zero_grad()
                out = model(torch.as_tensor(x[b], dtype=torch.float32)).reshape(len(b), -1)
                torch.nn.functional.mse_loss(out, torch.as_tensor(y[b], dtype=torch.float32)).backward()
                for s, v in zip(sums, variables):
                    if v.grad is not None:
                        s += v.grad.detach().numpy().astype(np.float64) ** 2
        return {n: s / len(batches) for n, s in zip(names, sums)}

    def reinit(self, network, seed: int):
        """A fresh initialization of ``network``'s architecture, the same at every site for one ``seed``."""
        return seeded_init(network, seed)


def seeded_init(network, seed: int):
    """A fresh initialization drawn in numpy from ``seed`` alone: identical at every site.

    Keras's own initializers, seeded with ``keras.utils.set_random_seed``, gave *different* values
    at different sites for the same seed (their random state depends on the model loaded before),
    and averaging those "common" starts shrank them toward zero. The distributions are Keras's
    defaults: Glorot-uniform input kernels, orthogonal recurrent kernels, zero biases with the LSTM
    forget gate at 1 (unit_forget_bias); batch normalization starts as the identity. A
    ``Normalization`` layer keeps the site's statistics (they describe the data, not the model).
    """
    from secagg.merge.layers import BatchNorm, Bidirectional, Dense, Normalization, Recurrent

    rng = np.random.default_rng(seed)

    def glorot(shape):
        limit = np.sqrt(6.0 / (shape[0] + shape[1]))
        return rng.uniform(-limit, limit, size=shape)

    def orthogonal(units, cols):
        q, r = np.linalg.qr(rng.standard_normal((cols, units)))
        return (q * np.sign(np.diag(r))).T  # (units, cols), orthonormal rows

    def recurrent(layer):
        units = layer.recurrent_kernel.shape[0]
        bias = np.zeros_like(layer.bias, dtype=np.float64)
        if layer.kind == "lstm":
            f = layer.gate_slice("f")
            bias[f] = 1.0
        return dataclasses.replace(
            layer, kernel=glorot(layer.kernel.shape), recurrent_kernel=orthogonal(units, layer.recurrent_kernel.shape[1]),
            bias=bias, recurrent_bias=None if layer.recurrent_bias is None else np.zeros_like(layer.recurrent_bias))

    fresh = network
    for i, layer in enumerate(network.layers):
        if isinstance(layer, Recurrent):
            new = recurrent(layer)
        elif isinstance(layer, Bidirectional):
            new = dataclasses.replace(layer, forward=recurrent(layer.forward), backward=recurrent(layer.backward))
        elif isinstance(layer, Dense):
            new = dataclasses.replace(layer, kernel=glorot(layer.kernel.shape),
                                      bias=None if layer.bias is None else np.zeros_like(layer.bias))
        elif isinstance(layer, BatchNorm):
            n = layer.input_dim
            new = dataclasses.replace(layer, mean=np.zeros(n), var=np.ones(n),
                                      gamma=None if layer.gamma is None else np.ones(n),
                                      beta=None if layer.beta is None else np.zeros(n))
        elif isinstance(layer, Normalization):
            new = layer
        else:
            continue  # no weights
        fresh = fresh.replace(i, new)
    return fresh
