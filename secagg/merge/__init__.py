"""Merging independently trained models into one global model.

:mod:`secagg.merge.network` gives a framework-independent numpy view of a recurrent regression
network (Keras LSTM/GRU + Dense chains, PyTorch state dicts following the documented
convention) that writes back to the exact model tensors; :mod:`secagg.merge.align` aligns hidden
units between such networks by permutation (weight or activation matching). Neither imports
TensorFlow or torch until a model file of that framework is read; alignment needs SciPy.
``SequenceRegressor`` (the PyTorch module of the convention) is created on first access.
"""

from secagg.merge.align import (
    activation_correlation,
    apply_permutations,
    match_activations,
    match_weights,
    permutable_layers,
    permute_units,
)
from secagg.merge.network import (
    Dense,
    Network,
    Recurrent,
    load_network,
    make_torch_regressor,
    network_from_tensors,
)

__all__ = [
    "Dense",
    "Network",
    "Recurrent",
    "activation_correlation",
    "apply_permutations",
    "load_network",
    "make_torch_regressor",
    "match_activations",
    "match_weights",
    "network_from_tensors",
    "permutable_layers",
    "permute_units",
]


def __getattr__(name: str):
    # Created on first use: importing secagg.merge needs no torch.
    if name == "SequenceRegressor":
        from secagg.merge.network import _regressor_class

        return _regressor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
