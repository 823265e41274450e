"""Round trips and error cases of secagg.models with real (tiny) Keras and PyTorch models."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.models import SUPPORTED_SUFFIXES, read_model, write_model
from secagg.packing import ModelTensors

REPO = Path(__file__).resolve().parents[2]


def _perturbed(tensors: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """New float64 values of the same shapes (positive, so BN variances stay valid)."""
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(0.5, 1.5, a.shape) for n, a in tensors.items()}


def _truncate(path: Path, dst: Path) -> Path:
    data = path.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# --- generic --------------------------------------------------------------------------------


def test_import_does_not_load_frameworks():
    code = (
        "import sys, secagg.models\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_supported_suffixes():
    assert SUPPORTED_SUFFIXES == (".keras", ".h5", ".pt", ".pth", ".npz")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="unsupported model file suffix"):
        read_model(path)
    with pytest.raises(ModelFormatError, match="unsupported model file suffix"):
        write_model(path, {}, tmp_path / "out.onnx")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no such model file"):
        read_model(tmp_path / "nope.npz")


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(ModelFormatError, match="corrupt or truncated") as err:
        read_model(path)
    assert str(path) in str(err.value)


# --- npz ------------------------------------------------------------------------------------


@pytest.fixture
def npz_file(tmp_path):
    tensors = {
        "dense/kernel": np.arange(21, dtype=np.float32).reshape(7, 3),
        "empty": np.zeros((0,), np.float32),
        "one": np.array([2.5], np.float64),
        "scalar": np.array(1.5, np.float16),
        "counts": np.array([1, -2, 3, 4, 5], np.int32),
        "block.0/w": np.ones((3, 5, 2), np.float32),
    }
    path = tmp_path / "model.npz"
    np.savez(path, **tensors)
    return path, tensors


def test_npz_round_trip(tmp_path, npz_file):
    path, original = npz_file
    read = read_model(path)
    assert list(read) == list(original)
    for name, arr in original.items():
        assert read[name].dtype == arr.dtype and np.array_equal(read[name], arr)

    new = _perturbed(read)
    new["counts"] = np.array([1.4, 2.6, -3.5, 7.0, 0.0])  # averaged integers: rint, then cast
    out = write_model(path, new, tmp_path / "out.npz")
    assert out == tmp_path / "out.npz"
    back = read_model(out)
    assert list(back) == list(original)
    for name, arr in original.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
    assert np.array_equal(back["counts"], [1, 3, -4, 7, 0])
    for name in ("dense/kernel", "one", "scalar", "block.0/w"):
        assert np.array_equal(back[name], new[name].astype(original[name].dtype))
    # readable by plain numpy too
    with np.load(out) as z:
        assert list(z.files) == list(original)


def test_npz_upper_case_suffix_and_overwrite_template(tmp_path, npz_file):
    path, original = npz_file
    upper = tmp_path / "MODEL.NPZ"
    upper.write_bytes(path.read_bytes())
    new = _perturbed(original)
    write_model(upper, new, upper)  # writing over the template is allowed
    assert np.array_equal(read_model(upper)["one"], new["one"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MODEL.NPZ", "model.npz"]


def test_npz_write_errors(tmp_path, npz_file):
    path, original = npz_file
    good = dict(original)

    bad = dict(good, **{"dense/kernel": np.zeros((3, 7))})
    with pytest.raises(ModelFormatError, match=r"'dense/kernel' has shape \(3, 7\).*\(7, 3\)"):
        write_model(path, bad, tmp_path / "out.npz")

    # Names that are not the template's are matched by position; a missing or extra tensor is named
    # with both sides.
    missing = {k: v for k, v in good.items() if k != "scalar"}
    with pytest.raises(ModelFormatError, match=r"at tensor 4 of 6 \(the template has 6 tensors, the tensors to write "
                                               r"have 5\): the template has 'scalar' \(\) float16, the tensors to "
                                               r"write have 'counts' \(5,\) int32\. Names may differ"):
        write_model(path, missing, tmp_path / "out.npz")

    with pytest.raises(ModelFormatError, match=r"at tensor 7 of 6 \(the template has 6 tensors, the tensors to write "
                                               r"have 7\): the template has no tensor there, the tensors to write have "
                                               r"'extra' \(1,\) float64"):
        write_model(path, dict(good, extra=np.zeros(1)), tmp_path / "out.npz")

    with pytest.raises(ModelFormatError, match="template's suffix .npz"):
        write_model(path, good, tmp_path / "out.pt")

    with pytest.raises(ModelFormatError, match="outside"):
        write_model(path, dict(good, counts=np.full(5, 1e12)), tmp_path / "out.npz")

    assert not (tmp_path / "out.npz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_npz_write_by_position(tmp_path, npz_file):
    """Tensors under other names, or a plain list in the template's order, are written under the template's names."""
    path, original = npz_file
    new = _perturbed(original, seed=7)
    new["counts"] = np.array([3.0, 1.0, 4.0, 1.0, 5.0])  # whole numbers: the cast to int32 is exact
    renamed = {f"other_{i}": arr for i, arr in enumerate(new.values())}
    for given in (renamed, list(new.values())):
        out = write_model(path, given, tmp_path / "out.npz")
        back = read_model(out)
        assert list(back) == list(original)
        for name, arr in original.items():
            assert back[name].dtype == arr.dtype
            assert np.array_equal(back[name], new[name].astype(arr.dtype))
    shuffled = list(new.values())
    shuffled[0], shuffled[5] = shuffled[5], shuffled[0]
    with pytest.raises(ModelFormatError, match=r"at tensor 1 of 6: the template has 'dense/kernel' \(7, 3\) float32, "
                                               r"the tensors to write have '#1' \(3, 5, 2\) float64"):
        write_model(path, shuffled, tmp_path / "out2.npz")
    assert not (tmp_path / "out2.npz").exists()


def test_npz_truncated_and_pickled(tmp_path, npz_file):
    path, _ = npz_file
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        read_model(_truncate(path, tmp_path / "cut.npz"))

    obj = tmp_path / "obj.npz"
    np.savez(obj, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelFormatError, match="pickled object array"):
        read_model(obj)

    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ModelFormatError, match="not an .npz archive"):
        read_model(single)


# --- Keras ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    """name -> (model, {".keras": path, ".h5": path}, example input)."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    built = {
        "lstm": (
            keras.Sequential(
                [keras.Input((24, 1)), layers.LSTM(8, name="lstm"), layers.Dense(1, name="dense")]
            ),
            rng.standard_normal((3, 24, 1)).astype(np.float32),
        ),
        "bn": (
            keras.Sequential(
                [
                    keras.Input((4,)),
                    layers.Dense(3, name="d1"),
                    layers.BatchNormalization(name="bn"),
                    layers.Dense(1, name="d2"),
                ]
            ),
            rng.standard_normal((5, 4)).astype(np.float32),
        ),
    }
    out = {}
    directory = tmp_path_factory.mktemp("keras")
    for name, (model, x) in built.items():
        paths = {s: directory / f"{name}{s}" for s in (".keras", ".h5")}
        for p in paths.values():
            model.save(p)
        out[name] = (model, paths, x)
    return out


KERAS_NAMES = {
    "lstm": [
        "lstm/lstm_cell/kernel",
        "lstm/lstm_cell/recurrent_kernel",
        "lstm/lstm_cell/bias",
        "dense/kernel",
        "dense/bias",
    ],
    "bn": [
        "d1/kernel",
        "d1/bias",
        "bn/gamma",
        "bn/beta",
        "bn/moving_mean",
        "bn/moving_variance",
        "d2/kernel",
        "d2/bias",
    ],
}


KERAS_LAYER_TYPES = {
    "lstm": ["LSTM"] * 3 + ["Dense"] * 2,
    "bn": ["Dense"] * 2 + ["BatchNormalization"] * 4 + ["Dense"] * 2,
}


@pytest.mark.parametrize("kind", ["lstm", "bn"])
@pytest.mark.parametrize(
    "suffix,out_suffix",
    [(".keras", ".keras"), (".h5", ".h5"), (".keras", ".h5"), (".h5", ".keras")],
)
def test_keras_round_trip(tmp_path, keras_models, kind, suffix, out_suffix):
    keras = pytest.importorskip("keras")
    model, paths, x = keras_models[kind]
    tensors = read_model(paths[suffix])
    assert list(tensors) == KERAS_NAMES[kind]
    assert [tensors.layer_types[n] for n in tensors] == KERAS_LAYER_TYPES[kind]
    for t, w in zip(tensors.values(), model.weights):
        assert t.dtype == np.float32 and np.array_equal(t, keras.ops.convert_to_numpy(w))

    new = _perturbed(tensors, seed=3)
    out = write_model(paths[suffix], new, tmp_path / f"out{out_suffix}")
    back = read_model(out)
    assert list(back) == KERAS_NAMES[kind]
    for name in new:
        assert back[name].dtype == np.float32
        assert np.array_equal(back[name], new[name].astype(np.float32))

    loaded = keras.models.load_model(out, compile=False)
    reference = keras.models.load_model(paths[suffix], compile=False)
    for w, arr in zip(reference.weights, new.values()):
        w.assign(arr.astype(np.float32))
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )


def test_keras_names_stable_across_formats_for_nested_models(tmp_path):
    keras = pytest.importorskip("keras")
    layers = keras.layers
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(2, name="dense")], name="inner")
    model = keras.Sequential(
        [
            keras.Input((3, 1)),
            layers.Bidirectional(layers.LSTM(2, name="lstm"), name="bidi"),
            inner,
        ],
        name="whatever_1",
    )
    names, types = {}, {}
    for suffix in (".keras", ".h5"):
        model.save(tmp_path / f"m{suffix}")
        tensors = read_model(tmp_path / f"m{suffix}")
        names[suffix], types[suffix] = list(tensors), [tensors.layer_types[n] for n in tensors]
    assert names[".keras"] == names[".h5"]
    assert names[".keras"][0] == "bidi/forward_lstm/lstm_cell/kernel"
    assert names[".keras"][-2:] == ["inner/dense/kernel", "inner/dense/bias"]
    assert types[".keras"] == types[".h5"] == ["Bidirectional/LSTM"] * 6 + ["Dense"] * 2


def test_keras_notebook_models_differ_in_names_only(tmp_path):
    """Identical models built in one session get auto-numbered names but the same structure."""
    keras = pytest.importorskip("keras")
    from secagg.packing import ModelSpec

    layers = keras.layers

    def build():  # no name=: Keras numbers the layers of each model it builds
        return keras.Sequential([keras.Input((5, 2)), layers.Bidirectional(layers.LSTM(3, return_sequences=True)),
                                 layers.TimeDistributed(layers.Dense(2)), layers.LSTM(4), layers.Dense(1)])

    paths = []
    for i, suffix in enumerate((".keras", ".h5", ".keras")):
        build().save(tmp_path / f"m{i}{suffix}")
        paths.append(tmp_path / f"m{i}{suffix}")
    models = [read_model(p) for p in paths]
    assert len({tuple(m) for m in models}) == 3  # three sets of names
    assert [models[0].layer_types[n] for n in models[0]] == (
        ["Bidirectional/LSTM"] * 6 + ["TimeDistributed/Dense"] * 2 + ["LSTM"] * 3 + ["Dense"] * 2)
    specs = [ModelSpec.of(m) for m in models]
    assert specs[0].hash == specs[1].hash == specs[2].hash
    assert specs[0].matches(specs[1]) and specs[0] != specs[1]
    # The third model's weights written into the first's file: the first's names, the third's values.
    out = write_model(paths[0], models[2], tmp_path / "out.keras")
    back = read_model(out)
    assert list(back) == list(models[0])
    assert all(np.array_equal(a, b) for a, b in zip(back.values(), models[2].values()))
    # get_weights() order is the order read_model gives.
    reloaded = keras.models.load_model(paths[2], compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(reloaded.get_weights(), models[2].values()))


def test_keras_write_refuses_another_layer_type(tmp_path):
    """Same shapes, other layers: an LSTM's weights do not go into a GRU-free template by position."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.Sequential([keras.Input((6,)), layers.Dense(4), layers.Dense(4)]).save(tmp_path / "dense.keras")
    keras.Sequential([keras.Input((6,)), layers.Dense(4), layers.BatchNormalization()]).save(tmp_path / "bn.keras")
    dense, bn = read_model(tmp_path / "dense.keras"), read_model(tmp_path / "bn.keras")
    assert [a.shape for a in dense.values()][:2] == [a.shape for a in bn.values()][:2]
    with pytest.raises(ModelFormatError, match=r"at tensor 3 of 4 \(the template has 4 tensors, the tensors to write "
                                               r"have 6\): the template has '.*kernel' \(4, 4\) float32 \(Dense\), "
                                               r"the tensors to write have '.*gamma' \(4,\) float32 "
                                               r"\(BatchNormalization\)"):
        write_model(tmp_path / "dense.keras", bn, tmp_path / "out.keras")


def test_keras_write_errors(tmp_path, keras_models):
    _, paths, _ = keras_models["lstm"]
    good = read_model(paths[".keras"])

    bad = dict(good, **{"dense/kernel": np.zeros((1, 8))})
    with pytest.raises(ModelFormatError, match=r"'dense/kernel' has shape \(1, 8\).*\(8, 1\)"):
        write_model(paths[".keras"], bad, tmp_path / "out.keras")

    missing = ModelTensors({k: v for k, v in good.items() if k != "lstm/lstm_cell/bias"}, good.layer_types)
    with pytest.raises(ModelFormatError, match=r"at tensor 3 of 5 \(the template has 5 tensors, the tensors to write "
                                               r"have 4\): the template has 'lstm/lstm_cell/bias' \(32,\) float32 "
                                               r"\(LSTM\), the tensors to write have 'dense/kernel' \(8, 1\) float32 "
                                               r"\(Dense\)\. Names may differ"):
        write_model(paths[".h5"], missing, tmp_path / "out.h5")

    with pytest.raises(ModelFormatError, match="template's suffix .keras"):
        write_model(paths[".keras"], good, tmp_path / "out.npz")
    assert not list(tmp_path.iterdir())


def test_keras_upper_case_suffixes(tmp_path, keras_models):
    _, paths, _ = keras_models["bn"]
    upper = tmp_path / "BN.H5"
    upper.write_bytes(paths[".h5"].read_bytes())
    tensors = read_model(upper)
    out = write_model(upper, tensors, tmp_path / "OUT.KERAS")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BN.H5", "OUT.KERAS"]
    assert all(np.array_equal(a, b) for a, b in zip(read_model(out).values(), tensors.values()))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_truncated(tmp_path, keras_models, suffix):
    _, paths, _ = keras_models["bn"]
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        read_model(_truncate(paths[suffix], tmp_path / f"cut{suffix}"))


def test_keras_custom_object_missing(tmp_path):
    keras = pytest.importorskip("keras")

    @keras.saving.register_keras_serializable(package="secagg_test")
    class Scaled(keras.layers.Dense):
        pass

    model = keras.Sequential([keras.Input((2,)), Scaled(2)])
    model.save(tmp_path / "custom.keras")
    del keras.saving.get_custom_objects()["secagg_test>Scaled"]
    with pytest.raises(ModelFormatError, match="custom layers"):
        read_model(tmp_path / "custom.keras")


# --- PyTorch --------------------------------------------------------------------------------


def _torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(1, 8, batch_first=True)
            self.bn = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 1)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(self.bn(out[:, -1]))

    torch.manual_seed(0)
    net = Net()
    net(torch.randn(4, 24, 1))  # training step: moves BN statistics, num_batches_tracked = 1
    return net.eval()


@pytest.fixture
def torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    net = _torch_net()
    plain = tmp_path / "model.pt"
    torch.save(net.state_dict(), plain)
    nested = tmp_path / "checkpoint.pth"
    optimizer = torch.optim.Adam(net.parameters())
    torch.save(
        {"epoch": 3, "model_state_dict": net.state_dict(), "optimizer": optimizer.state_dict()},
        nested,
    )
    return net, plain, nested


@pytest.mark.parametrize("which", ["plain", "nested"])
def test_torch_round_trip(tmp_path, torch_files, which):
    torch = pytest.importorskip("torch")
    net, plain, nested = torch_files
    template = plain if which == "plain" else nested
    tensors = read_model(template)
    state = net.state_dict()
    assert list(tensors) == list(state)
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    assert tensors["bn.num_batches_tracked"] == 1

    new = _perturbed(tensors, seed=5)
    new["bn.num_batches_tracked"] = np.array(6.6)  # an averaged counter: rounds to 7
    out = write_model(template, new, tmp_path / ("out.pth" if which == "plain" else "out.pt"))
    back = read_model(out)
    assert list(back) == list(state)
    assert back["bn.num_batches_tracked"].dtype == np.int64
    assert back["bn.num_batches_tracked"] == 7
    for name, arr in new.items():
        if name != "bn.num_batches_tracked":
            assert back[name].dtype == np.float32
            assert np.array_equal(back[name], arr.astype(np.float32))

    loaded = _torch_net()
    saved = torch.load(out, weights_only=True)
    if which == "nested":
        assert saved["epoch"] == 3
        template_optimizer = torch.load(nested, weights_only=True)["optimizer"]
        assert saved["optimizer"].keys() == template_optimizer.keys()
        saved = saved["model_state_dict"]
    loaded.load_state_dict(saved, strict=True)
    reference = _torch_net()
    reference.load_state_dict(
        {n: torch.from_numpy(np.asarray(a)).to(state[n].dtype) for n, a in new.items()},
        strict=True,
    )
    x = torch.randn(3, 24, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_torch_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bf.pt"
    torch.save({"w": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)}, path)
    tensors = read_model(path)
    assert tensors["w"].dtype == np.float32
    assert np.array_equal(tensors["w"], [1.5, -2.0, 3.25])
    write_model(path, {"w": np.array([1.0, 2.0, 1.00390625])}, tmp_path / "out.pt")
    back = torch.load(tmp_path / "out.pt", weights_only=True)["w"]
    assert back.dtype == torch.bfloat16
    assert back.tolist() == [1.0, 2.0, 1.0]  # 1 + 2**-8 rounds to nearest even bfloat16


def test_torch_refuses_whole_module_and_non_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), whole)  # the whole module, pickled
    with pytest.raises(ModelFormatError, match=r"save model\.state_dict\(\) instead"):
        read_model(whole)

    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "step": 3}, mixed)
    with pytest.raises(ModelFormatError, match=r"'step'.*save model\.state_dict\(\) instead"):
        read_model(mixed)

    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ModelFormatError, match="not a state dict"):
        read_model(listed)


def test_torch_errors(tmp_path, torch_files):
    _, plain, _ = torch_files
    good = read_model(plain)
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        read_model(_truncate(plain, tmp_path / "cut.pt"))

    bad = dict(good, **{"fc.weight": np.zeros((8, 1))})
    with pytest.raises(ModelFormatError, match=r"'fc.weight' has shape \(8, 1\).*\(1, 8\)"):
        write_model(plain, bad, tmp_path / "out.pt")

    missing = {k: v for k, v in good.items() if k != "bn.running_var"}
    with pytest.raises(ModelFormatError, match=r"at tensor 8 of 11 \(the template has 11 tensors, the tensors to "
                                               r"write have 10\): the template has 'bn.running_var' \(8,\) float32, "
                                               r"the tensors to write have 'bn.num_batches_tracked' \(\) int64"):
        write_model(plain, missing, tmp_path / "out.pt")

    with pytest.raises(ModelFormatError, match="template's suffix .pt"):
        write_model(plain, good, tmp_path / "out.keras")
    assert not (tmp_path / "out.pt").exists()


def test_pickle_of_numpy_is_not_npz(tmp_path):
    # A pickle with the .npz suffix must not be unpickled (allow_pickle=False).
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"a": np.zeros(2)}))
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        read_model(path)
