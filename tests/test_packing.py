"""Named tensors <-> flat vector, and the model spec that identifies an architecture."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.packing import ModelSpec, TensorSpec, flatten, unflatten


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
    with pytest.raises(ModelFormatError, match=r"tensor 'odd' has shape \(13, 7\), expected \(7, 13\)"):
        flatten(spec, other)
    with pytest.raises(ModelFormatError, match="vector has 3 values"):
        unflatten(spec, np.zeros(3), tensors)


def test_float_dtypes_round_trip_exactly():
    for dtype in (np.float16, np.float32, np.float64):
        a = np.array([0.1, -2.5, 65504 if dtype == np.float16 else 1e30, np.finfo(dtype).tiny], dtype=dtype)
        spec = ModelSpec.of({"a": a})
        back = unflatten(spec, flatten(spec, {"a": a}), {"a": a})["a"]
        np.testing.assert_array_equal(back.astype(dtype), a)


def _spec(*rows):
    return ModelSpec(tuple(TensorSpec(n, tuple(s), d) for n, s, d in rows))


def test_spec_hash_changes_with_name_shape_dtype_and_order():
    base = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    same = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    assert base == same and base.hash == same.hash and len(base.hash) == 64
    variants = {
        "name": _spec(("a", (2, 3), "float32"), ("c", (4,), "float32")),
        "shape": _spec(("a", (3, 2), "float32"), ("b", (4,), "float32")),
        "rank": _spec(("a", (6,), "float32"), ("b", (4,), "float32")),
        "dtype": _spec(("a", (2, 3), "float64"), ("b", (4,), "float32")),
        "order": _spec(("b", (4,), "float32"), ("a", (2, 3), "float32")),
        "extra": _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"), ("n", (), "int64")),
    }
    hashes = {k: v.hash for k, v in variants.items()}
    assert base.hash not in hashes.values()
    assert len(set(hashes.values())) == len(hashes)


def test_spec_json_round_trip_and_malformed():
    spec = _spec(("a", (2, 3), "float32"), ("s", (), "float64"), ("n", (0,), "int64"))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    for bad in ("not json", '[["a", 3, "float32"]]', "[1, 2]"):
        with pytest.raises(ModelFormatError, match="malformed model spec"):
            ModelSpec.from_json(bad)


def test_describe_difference_messages():
    base = _spec(("a", (2, 3), "float32"), ("b", (4,), "float32"))
    assert base.describe_difference(base) == "specs are identical"
    assert base.describe_difference(_spec(("a", (2, 3), "float32"))) == "tensor 'b' is missing"
    assert (base.describe_difference(_spec(("a", (2, 3), "float32"), ("b", (4,), "float32"), ("c", (1,), "float32")))
            == "unexpected tensor 'c'")
    assert (base.describe_difference(_spec(("b", (4,), "float32"), ("a", (2, 3), "float32")))
            == "tensor order differs at 'a' vs 'b'")
    assert (base.describe_difference(_spec(("a", (3, 2), "float32"), ("b", (4,), "float32")))
            == "tensor 'a' has shape (3, 2), expected (2, 3)")
    assert (base.describe_difference(_spec(("a", (2, 3), "float32"), ("b", (4,), "float16")))
            == "tensor 'b' has dtype float16, expected float32")
