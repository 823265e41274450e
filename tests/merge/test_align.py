"""secagg.merge.align: permuting hidden units keeps the function; matching recovers permutations.

Runs over the whole model zoo of test_network.py: stacked LSTM/GRU, Bidirectional layers (concat
and sum), heads on every time step, BatchNorm/Normalization/Activation layers between unit
layers, in Keras and PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.merge import (
    Bidirectional,
    Recurrent,
    activation_correlation,
    apply_permutations,
    match_activations,
    match_weights,
    permutable_layers,
    permute_units,
)
from secagg.merge.align import unit_groups
from secagg.models import read_model, write_model

from .test_network import ALL_NAMES, assert_same_tensors, cached_network, inputs, layer_arrays, rows, saved_models


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.getbasetemp() / "merge-models")


def random_perms(net, seed: int) -> list[np.ndarray]:
    """A random permutation of each permutable layer's outputs, moving units only within each of the
    layer's groups (the two directions of a Bidirectional concat layer) and none of them the identity."""
    rng = np.random.default_rng(seed)
    perms = []
    for index in permutable_layers(net):
        layer = net.layers[index]
        perm = np.arange(layer.output_dim)
        for group in unit_groups(layer):
            size = group.stop - group.start
            block = np.arange(size)
            while size > 1 and np.array_equal(block, np.arange(size)):
                block = rng.permutation(size)
            perm[group] = group.start + block
        perms.append(perm)
    return perms


def test_unit_groups(models):
    bi = cached_network(models["keras_bi"])
    assert unit_groups(bi.layers[0]) == [slice(0, 4), slice(4, 8)]  # concat: forward units, then backward
    assert unit_groups(bi.layers[1]) == [slice(0, 3)]  # sum: one unit is both directions
    lstm = cached_network(models["keras_stack"])
    assert [unit_groups(lstm.layers[i]) for i in permutable_layers(lstm)] == [[slice(0, 4)], [slice(0, 5)],
                                                                           [slice(0, 3)]]
    for name in ALL_NAMES:
        net = cached_network(models[name])
        assert permutable_layers(net) == net.unit_layers()
        for index, perm in zip(permutable_layers(net), random_perms(net, 0)):
            for group in unit_groups(net.layers[index]):
                assert sorted(perm[group]) == list(range(group.start, group.stop))
                assert not np.array_equal(perm[group], np.arange(group.start, group.stop))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permutation_keeps_the_models_function(models, tmp_path, name):
    saved = models[name]
    net = cached_network(saved)
    permuted = apply_permutations(net, random_perms(net, 1))
    tensors = permuted.to_tensors()
    original = read_model(saved.path)
    assert any(not np.array_equal(tensors[n], original[n]) for n in original)  # weights moved
    assert all(tensors[n].dtype == original[n].dtype for n in original)

    out = write_model(saved.path, tensors, tmp_path / f"permuted{saved.path.suffix}")
    assert_same_tensors(read_model(out), tensors)
    x = inputs(3)
    # The framework itself (Keras load_model, or the nn.Module with load_state_dict) runs the written file.
    np.testing.assert_allclose(saved.run_file(out, x), saved.run_file(saved.path, x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(permuted.forward(x), net.forward(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permute_units_semantics(models, name):
    net = cached_network(models[name])
    x = inputs(4, batch=4)
    before = net.hidden_states(x)
    assert sorted(before) == permutable_layers(net)
    for index, perm in zip(permutable_layers(net), random_perms(net, 10)):
        permuted = permute_units(net, index, perm)
        after = permuted.hidden_states(x)
        # new unit j is old unit perm[j]; the other layers' states are unchanged
        np.testing.assert_allclose(after[index], before[index][..., perm], atol=1e-12)
        for other in set(before) - {index}:
            np.testing.assert_allclose(after[other], before[other], atol=1e-12)
        np.testing.assert_allclose(permuted.forward(x), net.forward(x), atol=1e-12)
        # Per-feature layers between the unit layer and its consumer are reordered along with it.
        outs_before, outs_after = net.outputs(x), permuted.outputs(x)
        j = index + 1
        while j < len(net.layers) and j not in before and j != net.readout_index:
            np.testing.assert_allclose(outs_after[j], outs_before[j][..., perm], atol=1e-12)
            j += 1


def test_per_feature_layers_follow_the_permutation(models):
    """BatchNorm statistics and affine maps move with the units they normalize; the consumer's rows too."""
    net = cached_network(models["keras_norm"])  # Normalization -> LSTM -> BatchNorm -> Activation -> Dense
    perm = random_perms(net, 5)[0]
    permuted = permute_units(net, 1, perm)
    for field in ("mean", "var", "gamma", "beta"):
        np.testing.assert_array_equal(getattr(permuted.layers[2], field), getattr(net.layers[2], field)[perm])
    np.testing.assert_array_equal(permuted.layers[4].kernel, net.layers[4].kernel[perm])
    for field, value in layer_arrays(net.layers[0]).items():  # the input normalization is not a unit layer
        np.testing.assert_array_equal(layer_arrays(permuted.layers[0])[field], value)
    torch_net = cached_network(models["torch_bi"])  # Bi -> Bi -> LastStep -> Dense -> BatchNorm -> GELU -> Dense
    index = 3
    perm = random_perms(torch_net, 5)[permutable_layers(torch_net).index(index)]
    permuted = permute_units(torch_net, index, perm)
    np.testing.assert_array_equal(permuted.layers[3].kernel, torch_net.layers[3].kernel[:, perm])
    np.testing.assert_array_equal(permuted.layers[4].var, torch_net.layers[4].var[perm])
    np.testing.assert_array_equal(permuted.layers[6].kernel, torch_net.layers[6].kernel[perm])


def test_bidirectional_permutations_move_each_direction(models):
    net = cached_network(models["keras_bi"])
    concat, summed = net.layers[0], net.layers[1]
    perm = random_perms(net, 8)[0]
    u = concat.units
    permuted = permute_units(net, 0, perm)
    f, b = perm[:u], perm[u:] - u
    np.testing.assert_array_equal(permuted.layers[0].forward.recurrent_kernel,
                                  concat.forward.recurrent_kernel[f][:, np.concatenate([k * u + f for k in range(4)])])
    np.testing.assert_array_equal(permuted.layers[0].backward.bias,
                                  concat.backward.bias[np.concatenate([k * u + b for k in range(4)])])
    np.testing.assert_array_equal(permuted.layers[1].forward.kernel, summed.forward.kernel[perm])
    np.testing.assert_array_equal(permuted.layers[1].backward.kernel, summed.backward.kernel[perm])
    # merge_mode="sum": one permutation moves both directions alike.
    p = random_perms(net, 8)[1]
    permuted = permute_units(net, 1, p)
    g = np.concatenate([k * 3 + p for k in range(3)])
    for direction in ("forward", "backward"):
        np.testing.assert_array_equal(getattr(permuted.layers[1], direction).kernel,
                                      getattr(summed, direction).kernel[:, g])
    np.testing.assert_array_equal(permuted.layers[2].kernel, net.layers[2].kernel[p])


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_matching_recovers_a_known_permutation(models, name, method):
    reference = cached_network(models[name])
    perms = random_perms(reference, 2)
    shuffled = apply_permutations(reference, perms)
    if method == "weights":
        found = match_weights(reference, shuffled)
    else:
        found = match_activations(reference, shuffled, inputs(5, batch=64))
    assert len(found) == len(perms)
    if method == "weights":
        for f, p in zip(found, perms):
            np.testing.assert_array_equal(f, np.argsort(p))  # the inverses
        assert_same_tensors(apply_permutations(shuffled, found).to_tensors(), reference.to_tensors())
    else:
        x = inputs(5, batch=64)
        assert_recovered(found, perms, live_units(reference, x))
        np.testing.assert_allclose(apply_permutations(shuffled, found).forward(x), reference.forward(x), atol=1e-12)


def live_units(net, x: np.ndarray) -> list[np.ndarray]:
    """Per permutable layer: which units' activations vary on ``x`` (at least 1% of the layer's largest spread).

    A unit that is (nearly) constant on the data, e.g. a dead ReLU, carries no activation signal:
    activation matching can only place it among the other such units.
    """
    states = net.hidden_states(x)
    out = []
    for index in permutable_layers(net):
        spread = states[index].reshape(-1, states[index].shape[-1]).std(axis=0)
        out.append((spread > 1e-2 * spread.max()) & (spread > 1e-9))
    return out


def assert_recovered(found: list[np.ndarray], perms: list[np.ndarray], live: list[np.ndarray]) -> None:
    """``found`` inverts ``perms`` on every live unit (so dead units are matched among themselves)."""
    assert len(found) == len(perms) == len(live)
    for f, p, alive in zip(found, perms, live):
        assert alive.sum() >= len(alive) // 2  # most units carry signal: the check is not vacuous
        np.testing.assert_array_equal(f[alive], np.argsort(p)[alive])
        assert sorted(f) == list(range(len(f)))


def _perturbed(net, seed: int, scale: float = 0.04):
    """A copy of ``net`` with every weight, bias and statistic moved by Gaussian noise of ``scale`` times the
    array's RMS (a 'differently trained' model)."""
    rng = np.random.default_rng(seed)
    noisy = net.copy()
    for layer in noisy.layers:
        for field, value in layer_arrays(layer).items():
            value += rng.normal(0, scale * float(np.sqrt(np.mean(value**2))), value.shape)
            if field.endswith("var"):
                np.maximum(value, 1e-3, out=value)
    return noisy


@pytest.mark.parametrize("name", ALL_NAMES)
def test_matching_tolerates_noise(models, name):
    """A permuted copy with perturbed weights (a 'differently trained' model) still aligns."""
    reference = cached_network(models[name])
    perms = random_perms(reference, 6)
    noisy = _perturbed(reference, 7)
    assert any(not np.allclose(a, b) for a, b in zip(noisy.to_tensors().values(), reference.to_tensors().values()))
    shuffled = apply_permutations(noisy, perms)
    for f, p in zip(match_weights(reference, shuffled), perms):
        np.testing.assert_array_equal(f, np.argsort(p))
    x = inputs(8, 64)
    assert_recovered(match_activations(reference, shuffled, x), perms, live_units(reference, x))


@pytest.mark.parametrize("name", ["keras_stack", "keras_bi", "torch_bi", "keras_td", "keras_norm"])
def test_activation_correlation(models, name):
    net = cached_network(models[name])
    x = inputs(9, batch=32)
    perms = random_perms(net, 3)
    corr = activation_correlation(net, net, x)
    dims = [net.layers[i].output_dim for i in permutable_layers(net)]
    assert [c.shape for c in corr] == [(d, d) for d in dims]
    for c in corr:  # dead units correlate 0, every other unit 1 with itself
        assert np.all((np.abs(np.diag(c) - 1) < 1e-9) | (np.diag(c) == 0))
        assert np.all(np.abs(c) <= 1)
        assert np.sum(np.abs(np.diag(c) - 1) < 1e-9) >= len(c) - 1
    shuffled = activation_correlation(net, apply_permutations(net, perms), x)
    for c, s, p in zip(corr, shuffled, perms):
        np.testing.assert_allclose(s, c[:, p], atol=1e-12)


def test_activation_correlation_shapes(models):
    """A Bidirectional concat layer correlates all 2u outputs; a sum layer its u units."""
    assert [c.shape for c in activation_correlation(*[cached_network(models["keras_stack"])] * 2, inputs(9))] == [
        (4, 4), (5, 5), (3, 3)]
    bi = cached_network(models["keras_bi"])  # Bidirectional(LSTM(4)) concat, Bidirectional(GRU(3)) sum
    assert [c.shape for c in activation_correlation(bi, bi, inputs(9))] == [(8, 8), (3, 3)]
    torch_bi = cached_network(models["torch_bi"])  # 2 x Bidirectional(LSTM(3)) concat, Linear(4)
    assert [c.shape for c in activation_correlation(torch_bi, torch_bi, inputs(9))] == [(6, 6), (6, 6), (4, 4)]


def test_errors(models):
    net = cached_network(models["torch_dense2"])
    with pytest.raises(ValueError, match="output layer"):
        permute_units(net, len(net.layers) - 1, np.arange(2))
    with pytest.raises(ValueError, match="output layer"):
        permute_units(net, -1, np.arange(2))
    with pytest.raises(ValueError, match="permutation of 0..4"):
        permute_units(net, 0, np.array([0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match="permutation of 0..4"):
        permute_units(net, 0, np.arange(4))
    with pytest.raises(ValueError, match="permutation of 0..4"):
        permute_units(net, 0, np.arange(5.0))
    with pytest.raises(IndexError, match="out of range"):
        permute_units(net, 7, np.arange(5))
    with pytest.raises(ValueError, match="got 1 permutations"):
        apply_permutations(net, [np.arange(5)])
    other = cached_network(models["torch_lstm"])
    with pytest.raises(ModelFormatError, match="one architecture"):
        match_weights(net, other)
    with pytest.raises(ModelFormatError, match="one architecture"):
        match_activations(net, other, inputs(1))
    # A layer without units of its own cannot be permuted on its own.
    norm = cached_network(models["keras_norm"])
    with pytest.raises(ValueError, match="cannot be permuted"):
        permute_units(norm, 2, np.arange(4))  # the BatchNorm layer
    # A Bidirectional concat layer: a permutation may not mix the two directions.
    bi = cached_network(models["keras_bi"])
    assert isinstance(bi.layers[0], Bidirectional) and isinstance(bi.layers[0].forward, Recurrent)
    mixing = np.array([4, 1, 2, 3, 0, 5, 6, 7])
    with pytest.raises(ValueError, match="mixes the two directions"):
        permute_units(bi, 0, mixing)
    with pytest.raises(ValueError, match="mixes the two directions"):
        apply_permutations(bi, [mixing, np.arange(3)])
    with pytest.raises(ValueError, match="permutation of 0..7"):
        permute_units(bi, 0, np.arange(4))  # only one direction's units
    # The output of a permuted network with a head on every step keeps its flat shape.
    td = cached_network(models["keras_td"])
    x = inputs(2, batch=3)
    assert rows(apply_permutations(td, random_perms(td, 0)).forward(x)).shape == (3, 6)
