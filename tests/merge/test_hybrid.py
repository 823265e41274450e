"""The hybrid head (the merged network plus a linear skip from its input) and auto's choice among architectures.

The judge of every written model is its framework: Keras loads the file with nothing but
``keras.models.load_model``; PyTorch loads the state dict into the documented five-line module
around the sites' own ``nn.Module``.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import SecAggError
from secagg.merge.heads import HybridModel, LinearModel
from secagg.merge.simulate import simulate

TOL = 2e-5


def hybrid_reference(mh, base_tensors: dict, sites) -> np.ndarray:
    """The pooled ridge on [the base network's last features, the input window, 1], in plaintext."""
    z = [np.concatenate([mh.lstm_features(base_tensors, s.x_train), s.x_train.reshape(len(s.x_train), -1)], axis=1)
         for s in sites]
    return mh.pooled_ridge(z, [s.y_train for s in sites], mh.HEAD_RIDGE)


def test_keras_hybrid_is_the_pooled_ridge_and_loads_with_keras_alone(mh, simulated, keras_sites):
    result = simulated(keras_sites, "align+hybrid")
    model = result.network
    assert isinstance(model, HybridModel)
    base = model.base.to_tensors()
    w = hybrid_reference(mh, base, keras_sites)
    units = base["out/kernel"].shape[0]
    # The fitted head is the pooled ridge regression over all sites' rows (released statistics: float32 grid).
    x = np.concatenate([s.x_val for s in keras_sites])
    z = np.concatenate([mh.lstm_features(base, x), x.reshape(len(x), -1)], axis=1)
    want = z @ w[:-1] + w[-1]
    assert float(np.max(np.abs(model.forward(x) - want))) <= 1e-3 * float(np.max(np.abs(want)))
    assert model.skip.shape == (mh.WINDOW, 1) and w.shape[0] == units + mh.WINDOW + 1
    # Keras alone loads the file and computes the same function.
    np.testing.assert_allclose(mh.keras_predict(result.out, x).reshape(len(x), -1), model.forward(x),
                               atol=TOL, rtol=1e-4)
    # The skip is part of the function: without it the predictions differ.
    assert float(np.max(np.abs(model.base.forward(x) - model.forward(x)))) > 1e-2
    # secagg predict --adapt refits a hybrid's whole head (base output layer and skip) on the features
    # [base features, flattened window]: the framework model's view of it is exactly the fitted head.
    from secagg.models.framework import FrameworkModel

    fm = FrameworkModel.load(result.out)
    feats, (kernel, bias) = fm.features(x), fm.readout()
    assert kernel.shape == (units + mh.WINDOW, 1)
    np.testing.assert_allclose(feats @ kernel + bias, model.forward(x), atol=TOL, rtol=1e-4)
    fm.set_readout(kernel * 0.5, bias)  # written back into both layers
    np.testing.assert_allclose(fm.predict(x).reshape(len(x), -1), feats @ (kernel * 0.5) + bias, atol=TOL, rtol=1e-4)


def test_hybrid_fits_the_training_rows_at_least_as_well_as_readout_and_linear(mh, simulated, keras_sites):
    hybrid = simulated(keras_sites, "align+hybrid").network
    readout = simulated(keras_sites, "align+readout").network
    linear = simulated(keras_sites, "linear").network
    x = np.concatenate([s.x_train for s in keras_sites])
    y = np.concatenate([s.y_train for s in keras_sites]).reshape(len(x), -1)
    mse = {name: float(np.mean((m.forward(x) - y) ** 2)) for name, m in
           (("hybrid", hybrid), ("readout", readout), ("linear", linear))}
    # Its regression contains both others' (ridge penalties aside): on the rows it was fitted on it is the best.
    assert mse["hybrid"] <= min(mse["readout"], mse["linear"]) * 1.01, mse


def test_torch_hybrid_loads_into_the_documented_module(mh, simulated, torch_sites):
    import torch

    from secagg.merge.head_files import torch_hybrid_class
    from secagg.merge.torch_view import make_torch_regressor

    result = simulated(torch_sites, "align+hybrid", suffix=".pt")
    assert isinstance(result.network, HybridModel)
    state = torch.load(result.out, weights_only=True)
    assert "skip.weight" in state and all(k == "skip.weight" or k.startswith("base.") for k in state)
    module = torch_hybrid_class()(make_torch_regressor(**mh.torch_kwargs()), mh.WINDOW, 1)
    module.load_state_dict(state)
    module.eval()
    x = np.concatenate([s.x_val for s in torch_sites])
    with torch.no_grad():
        got = module(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)
    np.testing.assert_allclose(got, result.network.forward(x), atol=TOL, rtol=1e-4)
    # secagg's own commands (predict, diagnose) run it with the sites' module the same way.
    from secagg.models.framework import FrameworkModel

    framework = FrameworkModel.load(result.out, mh.TORCH_MODULE, mh.torch_kwargs())
    np.testing.assert_allclose(framework.predict(x).reshape(len(x), -1), got, atol=1e-6)
    feats, (kernel, bias) = framework.features(x), framework.readout()
    np.testing.assert_allclose(feats @ kernel + bias, got, atol=TOL, rtol=1e-4)


def test_auto_chooses_among_architectures_and_reports_it(mh, simulated, keras_sites):
    result = simulated(keras_sites, "auto")
    scores = result.chosen["scores"]["candidates"]
    chosen = result.chosen["chosen"]
    # Never worse on the pooled validation data than the linear model or any readout refit: all were candidates.
    others = [v for k, v in scores.items() if k.startswith("linear@") or "+readout@" in k]
    assert len(others) >= 3 and scores[chosen] <= min(others)
    kind = {"hybrid": HybridModel, "linear": LinearModel}.get(result.chosen["head"])
    if kind is not None:
        assert isinstance(result.network, kind)
    assert result.chosen["architecture"].split(":")[0] in ("hybrid", "linear", "the sites' architecture")


def test_same_architecture_keeps_the_sites_layers(mh, keras_sites, tmp_path):
    result = simulate("auto", [s.pair() for s in keras_sites], tmp_path / "g.keras", same_architecture=True,
                      workdir=tmp_path / "w")
    scores = result.chosen["scores"]
    assert not any("hybrid" in k or k.startswith("linear") for k in scores["candidates"])
    assert scores["skipped"]["+hybrid"] == scores["skipped"]["linear"] == "excluded by --same-architecture"
    assert result.chosen["architecture"].startswith("the sites' architecture")
    # The written file has exactly the sites' tensors: same names, same shapes.
    got = mh.read_tensors(result.out)
    site = mh.read_tensors(keras_sites[0].model)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in site.items()}


def test_hybrid_with_a_finetune_round_refits_the_hybrid_head(mh, keras_sites, tmp_path):
    result = simulate("align+hybrid", [s.pair() for s in keras_sites], tmp_path / "g.keras", finetune_rounds=1,
                      workdir=tmp_path / "w")
    names = [s.name for s in result.steps]
    assert names[-2:] == ["finetune1", "finetune-hybrid"]
    assert isinstance(result.network, HybridModel)
    x = keras_sites[0].x_val
    np.testing.assert_allclose(mh.keras_predict(result.out, x).reshape(len(x), -1), result.network.forward(x),
                               atol=TOL, rtol=1e-4)


def test_hybrid_is_refused_for_a_pipeline_out_of_order(keras_sites):
    with pytest.raises(SecAggError, match="readout or hybrid"):
        simulate("align+hybrid+regmean", [s.pair() for s in keras_sites[:2]])
