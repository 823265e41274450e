"""Merging independently trained models into one global model.

:mod:`secagg.merge.network` gives a framework-independent numpy view of a forecasting network
(Keras models from their files; PyTorch models from the user's ``nn.Module``), checked against the
framework's own forward pass, that writes back to the exact model tensors;
:mod:`secagg.merge.align` aligns hidden units between such networks by permutation (weight or
activation matching). Neither imports TensorFlow or torch until a model of that framework is
read; alignment needs SciPy. ``SequenceRegressor`` (a reference PyTorch forecaster) is created on
first access.
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
    Activation,
    BatchNorm,
    Bidirectional,
    Dense,
    LastStep,
    Network,
    Normalization,
    Recurrent,
    SiteModel,
    load_network,
    make_torch_regressor,
    open_model,
)

__all__ = [
    "Activation",
    "BatchNorm",
    "Bidirectional",
    "Dense",
    "LastStep",
    "Network",
    "Normalization",
    "Recurrent",
    "SiteModel",
    "activation_correlation",
    "apply_permutations",
    "load_network",
    "make_torch_regressor",
    "match_activations",
    "match_weights",
    "open_model",
    "permutable_layers",
    "permute_units",
]


def __getattr__(name: str):
    # Created on first use: importing secagg.merge needs no torch.
    if name == "SequenceRegressor":
        from secagg.merge.torch_view import regressor_class

        return regressor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
