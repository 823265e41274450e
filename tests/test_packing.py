"""Named tensors <-> flat vector, and the model spec that identifies an architecture by structure."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.packing import ModelSpec, ModelTensors, TensorSpec, flatten, unflatten

FIX = ("Names may differ; the layers must be the same kinds and sizes in the same order: build every site's model "
       "with the same code as the round's template.")


def _model(rng):
    return {
        "conv/kernel": rng.standard_normal((3, 3, 2, 5)).astype(np.float32),
        "odd": rng.standard_normal((7, 13)).astype(np.float64),
        "empty": np.zeros((0,), dtype=np.float32),
        "one": np.array([0.25], dtype=np.float16),
        "scalar": np.array(-1.5, dtype=np.float64),
        "counter": np.array(123456789, dtype=np.int64),
        "mask": rng.integers(0, 2, size=(4,)).astype(bool),
        "half": rng.standard_normal((3, 1, 1)).astype(np.float16),
        "ints": rng.integers(-5, 5, size=(2, 3)).astype(np.int32),
    }


def test_round_trip_all_shapes_and_dtypes(rng):
    tensors = _model(rng)
    spec = ModelSpec.of(tensors)
    float_names = [n for n, a in tensors.items() if a.dtype.kind == "f"]
    assert spec.num_params == sum(tensors[n].size for n in float_names) == 90 + 91 + 0 + 1 + 1 + 3
    vec = flatten(spec, tensors)
    assert vec.dtype == np.float64 and vec.shape == (spec.num_params,)
    # Order is the spec order, floats only.
    np.testing.assert_array_equal(vec, np.concatenate([tensors[n].astype(np.float64).ravel() for n in float_names]))

    # Integer/bool tensors come from the template, never from the vector.
    template = {n: (np.zeros_like(a) if a.dtype.kind != "f" else a) for n, a in tensors.items()}
    template["counter"] = np.array(7, dtype=np.int64)
    back = unflatten(spec, vec, template)
    assert list(back) == list(tensors)
    for name, arr in tensors.items():
        assert back[name].shape == arr.shape, name
        if arr.dtype.kind == "f":
            np.testing.assert_array_equal(back[name], arr.astype(np.float64))
        else:
            np.testing.assert_array_equal(back[name], template[name])
            assert back[name].dtype == arr.dtype
    assert back["counter"] == 7
    assert back["scalar"].shape == () and back["empty"].shape == (0,)


def test_unflatten_copies_template_tensors(rng):
    tensors = _model(rng)
    spec = ModelSpec.of(tensors)
    back = unflatten(spec, flatten(spec, tensors), tensors)
    back["ints"][0, 0] = 99
    assert tensors["ints"][0, 0] != 99


def test_int_tensors_are_not_aggregated():
    spec = ModelSpec.of({"w": np.zeros(3, np.float32), "n": np.zeros((), np.int64), "b": np.zeros(2, bool),
                         "u": np.zeros(4, np.uint8)})
    assert [t.aggregated for t in spec.tensors] == [True, False, False, False]
    assert spec.num_params == 3
    assert TensorSpec("x", (2, 3), "float16").size == 6 and TensorSpec("s", (), "float32").size == 1


def test_flatten_and_unflatten_refuse_a_mismatch(rng):
    tensors = _model(rng)
    spec = ModelSpec.of(tensors)
    other = dict(tensors, odd=tensors["odd"].T.copy())
    with pytest.raises(ModelFormatError) as info:
        flatten(spec, other)
    assert str(info.value) == ("model does not match the round's architecture at tensor 2 of 9: the round has 'odd' "
                               "(7, 13) float64, this model has 'odd' (13, 7) float64. " + FIX)
    with pytest.raises(ModelFormatError, match="vector has 3 values"):
        unflatten(spec, np.zeros(3), tensors)
    with pytest.raises(ModelFormatError, match=r"the template does not match the round's architecture at tensor 2 "
                                               r"of 9: the round has 'odd' \(7, 13\) float64, the template has"):
        unflatten(spec, flatten(spec, tensors), other)


def _renamed(tensors, prefix="m1_"):
    """The same tensors (same order and values) under other names, as a second model of one notebook gets."""
    return {prefix + name: arr for name, arr in tensors.items()}


def test_models_match_by_position_not_name(rng):
    tensors = _model(rng)
    spec = ModelSpec.of(tensors)
    renamed = _renamed(tensors)
    np.testing.assert_array_equal(flatten(spec, renamed), flatten(spec, tensors))
    # The average comes back under the template's names, in its order, whatever names the round has.
    back = unflatten(spec, flatten(spec, tensors), renamed)
    assert list(back) == list(renamed)
    np.testing.assert_array_equal(back["m1_odd"], tensors["odd"])
    np.testing.assert_array_equal(back["m1_counter"], renamed["m1_counter"])
    # The same names in another order are another architecture: position decides.
    swapped = dict(reversed(list(tensors.items())))
    with pytest.raises(ModelFormatError, match=r"at tensor 1 of 9: the round has 'conv/kernel' \(3, 3, 2, 5\) "
                                               r"float32, this model has 'ints' \(2, 3\) int32"):
        flatten(spec, swapped)


def test_layer_types_are_compared_where_both_sides_know_them():
    w = {"lstm/kernel": np.zeros((4, 8), np.float32), "dense/kernel": np.zeros((8, 1), np.float32)}
    keras_like = ModelTensors(w, {"lstm/kernel": "LSTM", "dense/kernel": "Dense"})
    spec = ModelSpec.of(keras_like)
    assert [t.layer_type for t in spec.tensors] == ["LSTM", "Dense"]
    # Another model of the same layers, other names: it matches.
    other = ModelTensors(_renamed(w), {"m1_lstm/kernel": "LSTM", "m1_dense/kernel": "Dense"})
    assert spec.matches(ModelSpec.of(other)) and ModelSpec.of(other).hash == spec.hash
    # Same shapes, but a GRU where the round has an LSTM: refused, naming both layer types.
    gru = ModelTensors(_renamed(w), {"m1_lstm/kernel": "GRU", "m1_dense/kernel": "Dense"})
    with pytest.raises(ModelFormatError) as info:
        flatten(spec, gru)
    assert str(info.value) == ("model does not match the round's architecture at tensor 1 of 2: the round has "
                               "'lstm/kernel' (4, 8) float32 (LSTM), this model has 'm1_lstm/kernel' (4, 8) float32 "
                               "(GRU). " + FIX)
    # A model without layer types (a plain dict, an npz) is compared on shapes and dtypes only.
    np.testing.assert_array_equal(flatten(spec, dict(w)), np.zeros(40))
    assert spec.matches(ModelSpec.of(w)) and ModelSpec.of(w).matches(spec)


def test_different_tensor_counts_are_named_with_both_sides():
    spec = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"), ("c", (1,), "float32"))
    fewer = {"x": np.zeros((2, 3), np.float32), "y": np.zeros(4, np.float32)}
    with pytest.raises(ModelFormatError) as info:
        flatten(spec, fewer)
    assert str(info.value) == ("model does not match the round's architecture at tensor 3 of 3 (the round has 3 "
                               "tensors, this model has 2): the round has 'c' (1,) float32, this model has no tensor "
                               "there. " + FIX)
    more = dict(fewer, z=np.zeros(1, np.float32), extra=np.zeros(2, np.float64))
    with pytest.raises(ModelFormatError, match=r"at tensor 4 of 3 \(the round has 3 tensors, this model has 4\): the "
                                               r"round has no tensor there, this model has 'extra' \(2,\) float64"):
        flatten(spec, more)


def test_float_dtypes_round_trip_exactly():
    for dtype in (np.float16, np.float32, np.float64):
        a = np.array([0.1, -2.5, 65504 if dtype == np.float16 else 1e30, np.finfo(dtype).tiny], dtype=dtype)
        spec = ModelSpec.of({"a": a})
        back = unflatten(spec, flatten(spec, {"a": a}), {"a": a})["a"]
        np.testing.assert_array_equal(back.astype(dtype), a)


def _spec(*rows):
    return ModelSpec(tuple(TensorSpec(n, tuple(s), d) for n, s, d in rows))


def _typed(*rows):
    return ModelSpec(tuple(TensorSpec(n, tuple(s), d, lt) for n, s, d, lt in rows))


def test_spec_hash_is_structural_not_by_name():
    base = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    same = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    assert base == same and base.hash == same.hash and len(base.hash) == 64
    # Keras' auto-numbered names (lstm, lstm_1, ...) do not change the hash.
    renamed = _spec(("lstm_1/kernel", (2, 3), "float32"), ("dense_1/bias", (4,), "float32"))
    assert renamed.hash == base.hash and renamed.matches(base) and renamed != base
    typed = _typed(("a", (2, 3), "float32", "LSTM"), ("b", (4,), "float32", "Dense"))
    assert _typed(("x", (2, 3), "float32", "LSTM"), ("y", (4,), "float32", "Dense")).hash == typed.hash
    variants = {
        "layer type": _typed(("a", (2, 3), "float32", "GRU"), ("b", (4,), "float32", "Dense")),
        "layer types known": typed,
        "shape": _spec(("a", (3, 2), "float32"), ("b", (4,), "float32")),
        "rank": _spec(("a", (6,), "float32"), ("b", (4,), "float32")),
        "dtype": _spec(("a", (2, 3), "float64"), ("b", (4,), "float32")),
        "order": _spec(("b", (4,), "float32"), ("a", (2, 3), "float32")),
        "wrapper": _typed(("a", (2, 3), "float32", "Bidirectional/LSTM"), ("b", (4,), "float32", "Dense")),
        "extra": _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"), ("n", (), "int64")),
    }
    hashes = {k: v.hash for k, v in variants.items()}
    assert base.hash not in hashes.values()
    assert len(set(hashes.values())) == len(hashes)


def test_spec_json_round_trip_and_malformed():
    spec = _spec(("a", (2, 3), "float32"), ("s", (), "float64"), ("n", (0,), "int64"))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    typed = _typed(("lstm/kernel", (2, 3), "float32", "Bidirectional/LSTM"), ("n", (), "int64", ""))
    assert typed.to_json() == '[["lstm/kernel",[2,3],"float32","Bidirectional/LSTM"],["n",[],"int64"]]'
    again = ModelSpec.from_json(typed.to_json())
    assert again == typed and again.hash == typed.hash
    # Rows of three (specs of rounds created before layer types) still load, with unknown types.
    old = ModelSpec.from_json('[["a",[2,3],"float32"],["s",[],"float64"]]')
    assert [t.layer_type for t in old.tensors] == ["", ""]
    for bad in ("not json", '[["a", 3, "float32"]]', "[1, 2]", '[["a", [1], "float32", 5]]',
                '[["a", [1], "float32", "LSTM", "x"]]', '[["a", [1]]]', '[["a", [1], "float32", "LS\\nTM"]]',
                '[["a", [1], "float32", "%s"]]' % ("L" * 201), '[["a", [1], "float32"], ["a", [2], "float32"]]',
                '[["a", [1099511627776, 2], "float32"]]'):
        with pytest.raises(ModelFormatError, match="malformed model spec"):
            ModelSpec.from_json(bad)


def test_describe_difference_messages():
    base = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    assert base.describe_difference(base) == "the architectures match"
    assert base.describe_difference(_spec(("x", (2, 3), "float32"), ("y", (4,), "float32"))) == "the architectures match"
    assert (base.describe_difference(_spec(("a", (2, 3), "float32")))
            == "at tensor 2 of 2 (the round has 2 tensors, this model has 1): the round has 'b' (4,) float32, "
               "this model has no tensor there")
    assert (base.describe_difference(_spec(("a", (2, 3), "float32"), ("b", (4,), "float32"), ("c", (1,), "float32")))
            == "at tensor 3 of 2 (the round has 2 tensors, this model has 3): the round has no tensor there, "
               "this model has 'c' (1,) float32")
    assert (base.describe_difference(_spec(("b", (4,), "float32"), ("a", (2, 3), "float32")))
            == "at tensor 1 of 2: the round has 'a' (2, 3) float32, this model has 'b' (4,) float32")
    assert (base.describe_difference(_spec(("a", (3, 2), "float32"), ("b", (4,), "float32")))
            == "at tensor 1 of 2: the round has 'a' (2, 3) float32, this model has 'a' (3, 2) float32")
    assert (base.describe_difference(_spec(("a", (2, 3), "float32"), ("b", (4,), "float16")), "site1.npz", "site2.npz")
            == "at tensor 2 of 2: site1.npz has 'b' (4,) float32, site2.npz has 'b' (4,) float16")
    typed = _typed(("lstm/bias", (32,), "float32", "LSTM"), ("dense/kernel", (8, 1), "float32", "Dense"))
    assert (typed.describe_difference(_typed(("gru/bias", (32,), "float32", "GRU"), ("d/kernel", (8, 1), "float32", "")))
            == "at tensor 1 of 2: the round has 'lstm/bias' (32,) float32 (LSTM), this model has 'gru/bias' (32,) "
               "float32 (GRU)")
