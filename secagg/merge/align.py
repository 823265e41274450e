"""Permutation alignment of hidden units between networks of one architecture.

Hidden units of a layer can be reordered without changing what the network computes, as long as
every place that indexes them is reordered too: the layer's own output columns (each gate block
of a recurrent layer), its recurrent kernel's rows, its biases, the per-feature layers that follow
(batch normalization statistics, element-wise activations), and the next layer's input rows.
Independently trained models therefore hold "the same" units in different orders; aligning them
to a reference before averaging is the first step of model merging.

Permutations follow one convention everywhere: applying ``perm`` to a layer makes its new output
``j`` the old output ``perm[j]``. A permutation covers the layer's whole output: for a
Bidirectional layer with ``merge_mode="concat"`` the forward units come first and the backward
units second, and a permutation may only reorder each direction among itself (its *groups*). A
list of permutations is indexed by *permutable layer* (:func:`permutable_layers`: every layer
with units of its own except the output layer, in network order). The matchers return the
permutations that, applied to ``net``, bring its units into ``reference``'s order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from secagg.errors import ModelFormatError
from secagg.merge.layers import (
    UNIT_LAYERS,
    Activation,
    BatchNorm,
    Bidirectional,
    Dense,
    LastStep,
    Layer,
    Normalization,
    Recurrent,
    describe,
)
from secagg.merge.network import Network

__all__ = [
    "activation_correlation",
    "apply_permutations",
    "match_activations",
    "match_weights",
    "permutable_layers",
    "permute_units",
    "unit_groups",
]


def permutable_layers(net: Network) -> list[int]:
    """Indices of the layers whose units can be permuted: every unit layer but the output layer."""
    return net.unit_layers()


def unit_groups(layer: Layer) -> list[slice]:
    """The blocks of a layer's outputs that a permutation may reorder among themselves."""
    if isinstance(layer, Bidirectional) and layer.merge_mode == "concat":
        u = layer.units
        return [slice(0, u), slice(u, 2 * u)]
    return [slice(0, layer.output_dim)]


def permute_units(net: Network, layer_index: int, perm: np.ndarray) -> Network:
    """A copy of ``net`` with the outputs of layer ``layer_index`` reordered (new j = old perm[j]).

    Recurrent layers: every gate block of the kernel, recurrent kernel (columns and rows), bias
    and recurrent bias; Bidirectional: each direction; Dense layers: their output columns and bias.
    The per-feature layers that follow and the next unit layer's input rows follow, so the network
    computes the same function. The output layer cannot be permuted.
    """
    n = len(net.layers)
    index = layer_index + n if layer_index < 0 else layer_index
    if not 0 <= index < n:
        raise IndexError(f"layer index {layer_index} is out of range for a network of {n} layers")
    if index not in net.unit_layers():
        what = "the output layer" if index == net.readout_index else f"a {describe(net.layers[index])} layer"
        raise ValueError(f"layer {layer_index} is {what}, whose outputs cannot be permuted")
    layer = net.layers[index]
    perm = _check_perm(perm, layer, index)
    layers = list(net.layers)
    layers[index] = _permute_outputs(layer, perm)
    for j in range(index + 1, n):
        layers[j] = _permute_inputs(layers[j], perm)
        if isinstance(layers[j], UNIT_LAYERS):
            break
    return Network(layers, net._source)


def apply_permutations(net: Network, perms: list[np.ndarray]) -> Network:
    """Apply one permutation per permutable layer (``perms[i]`` to the i-th permutable layer)."""
    indices = permutable_layers(net)
    if len(perms) != len(indices):
        raise ValueError(f"got {len(perms)} permutations for a network with {len(indices)} permutable layers "
                         "(the layers with hidden units, the output layer excluded)")
    for index, perm in zip(indices, perms):
        net = permute_units(net, index, perm)
    return net


def match_weights(reference: Network, net: Network, max_iter: int = 20) -> list[np.ndarray]:
    """Permutations aligning ``net``'s units to ``reference``'s by their incoming weights.

    Layer by layer from the input, after the earlier layers' permutations were applied to
    ``net``, each unit is described by its incoming weights: for a recurrent layer all gate
    blocks' kernel columns, bias and recurrent bias entries and its recurrent kernel row and
    column; for a Dense layer its kernel column and bias. The assignment maximizing the summed
    dot products is found with the Hungarian method. Because the recurrent kernel is indexed by
    the layer's own units on both sides, a recurrent layer is matched first on the parts that do
    not depend on its own order and then refined with the full recurrent kernel under the current
    estimate until the assignment stops changing (at most ``max_iter`` rounds). Each direction of
    a Bidirectional layer is matched on its own.
    """
    _check_compatible(reference, net)
    perms = []
    current = net
    for index in permutable_layers(net):
        ref_layer, layer = reference.layers[index], current.layers[index]
        if isinstance(layer, Dense):
            perm = _assign(_dense_features(ref_layer) @ _dense_features(layer).T)
        elif isinstance(layer, Recurrent):
            perm = _match_recurrent(ref_layer, layer, max_iter)
        else:
            f = _match_recurrent(ref_layer.forward, layer.forward, max_iter)
            if layer.merge_mode == "concat":
                perm = np.concatenate([f, layer.units + _match_recurrent(ref_layer.backward, layer.backward, max_iter)])
            else:
                perm = f
        perms.append(perm)
        current = permute_units(current, index, perm)
    return perms


def activation_correlation(reference: Network, net: Network, x: np.ndarray) -> list[np.ndarray]:
    """Per permutable layer, the (outputs, outputs) correlation of hidden activations on ``x``.

    Entry [i, j] is the Pearson correlation between reference output i and ``net`` output j over
    every batch item and time step (recurrent layers: the h sequences; Dense: the outputs).
    Outputs that are constant on ``x`` correlate 0 with everything.
    """
    _check_compatible(reference, net)
    ref_states, states = reference.hidden_states(x), net.hidden_states(x)
    return [_correlation(_flatten_units(ref_states[i]), _flatten_units(states[i])) for i in permutable_layers(net)]


def match_activations(reference: Network, net: Network, x: np.ndarray) -> list[np.ndarray]:
    """Permutations aligning ``net``'s units to ``reference``'s by activation correlation on ``x``.

    Per permutable layer (and per group of it, see :func:`unit_groups`) the Hungarian method picks
    the assignment with the largest summed correlation. A layer's activations do not depend on how
    the other layers' units are ordered, so one forward pass of each network suffices.
    """
    perms = []
    for index, corr in zip(permutable_layers(net), activation_correlation(reference, net, x)):
        perm = np.empty(len(corr), dtype=np.intp)
        for group in unit_groups(net.layers[index]):
            perm[group] = group.start + _assign(corr[group, group])
        perms.append(perm)
    return perms


# --- helpers -------------------------------------------------------------------------------


def _check_perm(perm: np.ndarray, layer: Layer, index: int) -> np.ndarray:
    perm = np.asarray(perm)
    n = layer.output_dim
    if perm.shape != (n,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError(f"the permutation for layer {index} must be a permutation of 0..{n - 1}, got {perm!r}")
    for group in unit_groups(layer):
        if not np.array_equal(np.sort(perm[group]), np.arange(group.start, group.stop)):
            raise ValueError(f"the permutation for layer {index} ({describe(layer)}) mixes the two directions; "
                             "reorder each direction's units among themselves")
    return perm.astype(np.intp)


def _gate_columns(layer: Recurrent, perm: np.ndarray) -> np.ndarray:
    u = layer.units
    return np.concatenate([k * u + perm for k in range(layer.gates)])


def _permute_recurrent(layer: Recurrent, perm: np.ndarray) -> Recurrent:
    cols = _gate_columns(layer, perm)
    return dataclasses.replace(
        layer,
        kernel=layer.kernel[:, cols],
        recurrent_kernel=layer.recurrent_kernel[perm][:, cols],
        bias=layer.bias[cols],
        recurrent_bias=None if layer.recurrent_bias is None else layer.recurrent_bias[cols],
    )


def _permute_outputs(layer: Layer, perm: np.ndarray) -> Layer:
    if isinstance(layer, Dense):
        return dataclasses.replace(layer, kernel=layer.kernel[:, perm], bias=None if layer.bias is None else layer.bias[perm])
    if isinstance(layer, Recurrent):
        return _permute_recurrent(layer, perm)
    u = layer.units
    if layer.merge_mode == "concat":
        f, b = perm[:u], perm[u:] - u
    else:
        f = b = perm
    return dataclasses.replace(layer, forward=_permute_recurrent(layer.forward, f),
                               backward=_permute_recurrent(layer.backward, b))


def _permute_inputs(layer: Layer, perm: np.ndarray) -> Layer:
    """``layer`` taking its input features in the order ``perm`` (per-feature layers reorder themselves)."""
    if isinstance(layer, (Dense, Recurrent)):
        return dataclasses.replace(layer, kernel=layer.kernel[perm])
    if isinstance(layer, Bidirectional):
        return dataclasses.replace(layer, forward=_permute_inputs(layer.forward, perm),
                                   backward=_permute_inputs(layer.backward, perm))
    if isinstance(layer, BatchNorm):
        return dataclasses.replace(layer, **{n: None if getattr(layer, n) is None else getattr(layer, n)[perm]
                                             for n in ("mean", "var", "gamma", "beta")})
    if isinstance(layer, Normalization):
        return dataclasses.replace(layer, mean=layer.mean[perm], var=layer.var[perm])
    if isinstance(layer, (Activation, LastStep)):
        return layer
    raise AssertionError(type(layer))


def _match_recurrent(ref_layer: Recurrent, layer: Recurrent, max_iter: int) -> np.ndarray:
    perm = _assign(_recurrent_features(ref_layer, full=False) @ _recurrent_features(layer, full=False).T)
    ref_features = _recurrent_features(ref_layer, full=True)
    for _ in range(max_iter):
        candidate = _permute_recurrent(layer, perm)
        step = _assign(ref_features @ _recurrent_features(candidate, full=True).T)
        if np.array_equal(step, np.arange(len(step))):
            break
        perm = perm[step]
    return perm


def _dense_features(layer: Dense) -> np.ndarray:
    parts = [layer.kernel.T]
    if layer.bias is not None:
        parts.append(layer.bias[:, None])
    return np.concatenate(parts, axis=1)


def _recurrent_features(layer: Recurrent, full: bool) -> np.ndarray:
    """(units, features): per gate (in canonical role order) the unit's incoming weights."""
    roles = "ifco" if layer.kind == "lstm" else "zrh"
    units = np.arange(layer.units)
    parts = []
    for role in roles:
        s = layer.gate_slice(role)
        block = layer.recurrent_kernel[:, s]  # [from unit, to unit]
        parts += [layer.kernel[:, s].T, layer.bias[s][:, None]]
        if layer.recurrent_bias is not None:
            parts.append(layer.recurrent_bias[s][:, None])
        if full:
            parts += [block.T, block]  # column (incoming from all units) and row (outgoing)
        else:
            parts.append(block[units, units][:, None])  # self-connection: order-independent
    return np.concatenate(parts, axis=1)


def _flatten_units(states: np.ndarray) -> np.ndarray:
    return states.reshape(-1, states.shape[-1])


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def standardize(m: np.ndarray) -> np.ndarray:
        m = m - m.mean(axis=0)
        norm = np.sqrt(np.sum(m * m, axis=0))
        return np.divide(m, norm, out=np.zeros_like(m), where=norm > 1e-12 * max(1.0, float(norm.max(initial=0.0))))

    return np.clip(np.nan_to_num(standardize(a).T @ standardize(b)), -1.0, 1.0)


def _assign(similarity: np.ndarray) -> np.ndarray:
    """perm with perm[i] = the column assigned to row i, maximizing the summed similarity."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # scipy is not a dependency of the base install
        raise ImportError("aligning units needs SciPy: pip install scipy") from e
    rows, cols = linear_sum_assignment(np.nan_to_num(similarity), maximize=True)
    perm = np.empty(len(rows), dtype=np.intp)
    perm[rows] = cols
    return perm


def _check_compatible(reference: Network, net: Network) -> None:
    if len(reference.layers) != len(net.layers):
        raise ModelFormatError(
            f"the networks differ in depth ({len(reference.layers)} vs {len(net.layers)} layers); "
            "only models of one architecture can be aligned"
        )
    for i, (a, b) in enumerate(zip(reference.layers, net.layers)):
        if describe(a) != describe(b) or a.input_dim != b.input_dim:
            raise ModelFormatError(
                f"layer {i} differs between the networks ({describe(a)} vs {describe(b)}); "
                "only models of one architecture can be aligned"
            )
