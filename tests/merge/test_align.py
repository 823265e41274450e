"""secagg.merge.align: permuting hidden units keeps the function; matching recovers permutations."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.merge import (
    Dense,
    activation_correlation,
    apply_permutations,
    match_activations,
    match_weights,
    permutable_layers,
    permute_units,
)
from secagg.models import read_model, write_model

from .test_network import ALL_NAMES, assert_same_tensors, cached_network, inputs, saved_models


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.getbasetemp() / "merge-models")


def random_perms(net, seed: int) -> list[np.ndarray]:
    """A random permutation per permutable layer, none of them the identity."""
    rng = np.random.default_rng(seed)
    perms = []
    for index in permutable_layers(net):
        units = net.layers[index].units
        perm = rng.permutation(units)
        while np.array_equal(perm, np.arange(units)):
            perm = rng.permutation(units)
        perms.append(perm)
    return perms


@pytest.mark.parametrize("name", ALL_NAMES)
def test_permutation_keeps_the_models_function(models, tmp_path, name):
    saved = models[name]
    net = cached_network(saved.path)
    permuted = apply_permutations(net, random_perms(net, 1))
    tensors = permuted.to_tensors()
    original = read_model(saved.path)
    assert any(not np.array_equal(tensors[n], original[n]) for n in original)  # weights moved
    assert all(tensors[n].dtype == original[n].dtype for n in original)

    out = write_model(saved.path, tensors, tmp_path / f"permuted{saved.path.suffix}")
    assert_same_tensors(read_model(out), tensors)
    x = inputs(3)
    np.testing.assert_allclose(saved.run_file(out, x), saved.run_file(saved.path, x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(permuted.forward(x), net.forward(x), atol=1e-12, rtol=0)


def test_permute_units_semantics(models):
    net = cached_network(models["keras_stack"].path)
    x = inputs(4, batch=4)
    before = net.hidden_states(x)
    for index in permutable_layers(net):
        perm = random_perms(net, 10 + index)[index]
        after = permute_units(net, index, perm).hidden_states(x)
        # new unit j is old unit perm[j]; the other layers' states are unchanged
        np.testing.assert_allclose(after[index], before[index][..., perm], atol=1e-12)
        for other in set(range(len(net.layers))) - {index}:
            np.testing.assert_allclose(after[other], before[other], atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_matching_recovers_a_known_permutation(models, name, method):
    reference = cached_network(models[name].path)
    perms = random_perms(reference, 2)
    shuffled = apply_permutations(reference, perms)
    if method == "weights":
        found = match_weights(reference, shuffled)
    else:
        found = match_activations(reference, shuffled, inputs(5, batch=64))
    assert len(found) == len(perms)
    for f, p in zip(found, perms):
        np.testing.assert_array_equal(f, np.argsort(p))  # the inverses
    assert_same_tensors(apply_permutations(shuffled, found).to_tensors(), reference.to_tensors())


@pytest.mark.parametrize("name", ["keras_gru_stack", "torch_lstm2", "keras_stack"])
def test_matching_tolerates_noise(models, name):
    """A permuted copy with perturbed weights (a 'differently trained' model) still aligns."""
    reference = cached_network(models[name].path)
    perms = random_perms(reference, 6)
    rng = np.random.default_rng(7)
    noisy = reference.copy()
    for layer in noisy.layers:
        layer.kernel += rng.normal(0, 0.02, layer.kernel.shape)
        if isinstance(layer, Dense) and layer.bias is not None:
            layer.bias += rng.normal(0, 0.02, layer.bias.shape)
    shuffled = apply_permutations(noisy, perms)
    for found in (match_weights(reference, shuffled), match_activations(reference, shuffled, inputs(8, 64))):
        for f, p in zip(found, perms):
            np.testing.assert_array_equal(f, np.argsort(p))


def test_activation_correlation(models):
    net = cached_network(models["keras_stack"].path)
    x = inputs(9, batch=32)
    perms = random_perms(net, 3)
    corr = activation_correlation(net, net, x)
    assert [c.shape for c in corr] == [(4, 4), (5, 5), (3, 3)]
    for c in corr:  # dead ReLU units correlate 0, every other unit 1 with itself
        assert np.all((np.abs(np.diag(c) - 1) < 1e-9) | (np.diag(c) == 0))
        assert np.all(np.abs(c) <= 1)
    shuffled = activation_correlation(net, apply_permutations(net, perms), x)
    for c, s, p in zip(corr, shuffled, perms):
        np.testing.assert_allclose(s, c[:, p], atol=1e-12)


def test_errors(models):
    net = cached_network(models["torch_dense2"].path)
    with pytest.raises(ValueError, match="output layer"):
        permute_units(net, len(net.layers) - 1, np.arange(2))
    with pytest.raises(ValueError, match="output layer"):
        permute_units(net, -1, np.arange(2))
    with pytest.raises(ValueError, match="permutation of 0..4"):
        permute_units(net, 0, np.array([0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match="got 1 permutations"):
        apply_permutations(net, [np.arange(5)])
    other = cached_network(models["torch_lstm"].path)
    with pytest.raises(ModelFormatError, match="one architecture"):
        match_weights(net, other)
