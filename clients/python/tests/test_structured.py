"""The structured schemes (orthogonal, eye, identity, dirac, sparse): the NumPy implementation in
structured_ref.py and the real server agree on every committed case, and torch's own tests of
eye_, dirac_, orthogonal_ and sparse_ hold for the server's output."""

import json
import math

import blake3
import grpc
import numpy as np
import pytest
import structured_ref
import torch
from conftest import REPO

import weightinit

CASES = json.loads((REPO / "tests" / "data" / "structured-v1.json").read_text())["cases"]
TIMEOUT = 60


def _fetch(target, init, shape, **fields):
    """The whole tensor "w" in float64 from the server, as a numpy array."""
    request = {
        "seed": 4,
        "dtype": "DTYPE_FLOAT64",
        "tensors": [{"name": "w", "shape": list(shape), "init": init, **fields}],
    }
    return np.asarray(weightinit.fetch(request, target, timeout=TIMEOUT)["w"])


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_numpy_reference_gives_the_committed_digests(case):
    request = case["request"]
    for spec, expect in zip(request["tensors"], case["expect"], strict=True):
        data = structured_ref.tensor(request["seed"], spec, request)
        assert len(data) == expect["byte_length"], expect["name"]
        assert blake3.blake3(data).hexdigest() == expect["blake3"], expect["name"]


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_server_gives_the_committed_digests(case, target):
    expected = {expect["name"]: expect["blake3"] for expect in case["expect"]}
    assert weightinit.digest(case["request"], target, timeout=TIMEOUT) == expected
    fetched = weightinit.fetch(case["request"], target, timeout=TIMEOUT)
    for name, value in fetched.items():
        raw = value.tobytes() if isinstance(value, np.ndarray) else _bf16_bytes(value)
        assert blake3.blake3(raw).hexdigest() == expected[name], name


def _bf16_bytes(value):
    return value.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("shape", [(3, 3), (4, 7), (9, 2), (1, 5)])
def test_eye_equals_torch(shape, target):
    # torch's test_eye: eye_ of a 2-D tensor.
    want = torch.nn.init.eye_(torch.empty(shape, dtype=torch.float64)).numpy()
    assert np.array_equal(_fetch(target, {"eye": {}}, shape), want)


@pytest.mark.parametrize("gain", [1.0, 0.5, -2.0])
def test_identity_equals_keras(gain, target):
    import keras

    want = np.asarray(keras.initializers.Identity(gain=gain)((5, 3), dtype="float32"))
    assert np.array_equal(_fetch(target, {"identity": {"gain": gain}}, (5, 3)), want)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((6, 4, 3), 1),
        ((6, 4, 3), 2),
        ((4, 6, 3, 5), 1),
        ((8, 3, 3, 3), 2),
        ((12, 2, 3, 1, 4), 3),
        ((5, 7, 2, 2), 1),
        ((6, 2, 3, 3), 6),
    ],
)
def test_dirac_equals_torch(shape, groups, target):
    # torch's test_dirac_properties / test_dirac_identity: dirac_ with groups on 3-5-D.
    want = torch.nn.init.dirac_(torch.empty(shape, dtype=torch.float64), groups).numpy()
    assert np.array_equal(_fetch(target, {"dirac": {"groups": groups}}, shape), want)


def test_dirac_under_keras_layout_is_torchs_transposed(target):
    torch_shape = (8, 4, 3, 3)
    want = torch.nn.init.dirac_(torch.empty(torch_shape, dtype=torch.float64), 2).numpy()
    got = _fetch(target, {"dirac": {"groups": 2}}, (3, 3, 4, 8), layout="LAYOUT_KERAS")
    assert np.array_equal(got, np.transpose(want, (2, 3, 1, 0)))


@pytest.mark.parametrize(
    ("shape", "gain", "layout"),
    [
        ((20, 20), 1.0, "LAYOUT_TORCH"),
        ((30, 12), 2.0, "LAYOUT_TORCH"),
        ((12, 30), 0.5, "LAYOUT_TORCH"),
        ((16, 4, 3, 3), 1.0, "LAYOUT_TORCH"),
        ((64, 8, 3), math.sqrt(2), "LAYOUT_TORCH"),
        ((3, 3, 4, 16), 1.0, "LAYOUT_KERAS"),
        ((7, 50), 1.0, "LAYOUT_KERAS"),
    ],
)
def test_orthogonal_properties(shape, gain, layout, target):
    # torch's test_orthogonal: the flattened matrix has orthonormal rows or columns times gain.
    q = _fetch(target, {"orthogonal": {"gain": gain}}, shape, layout=layout)
    rows = shape[0] if layout == "LAYOUT_TORCH" else math.prod(shape[:-1])
    flat = q.reshape(rows, -1)
    if flat.shape[0] > flat.shape[1]:
        gram = flat.T @ flat
    else:
        gram = flat @ flat.T
    assert np.abs(gram - gain**2 * np.eye(gram.shape[0])).max() <= 1e-12
    assert q.shape == tuple(shape)


def test_orthogonal_is_torchs_qr_of_the_same_draws(target):
    """Q with R's diagonal made positive is unique, so LAPACK's QR of the tensor's own normal
    draws (the `normal` scheme) gives the same matrix up to rounding."""
    draws = _fetch(target, {"normal": {}}, (40, 25))
    q, r = torch.linalg.qr(torch.from_numpy(draws))
    q *= torch.sign(torch.diag(r))
    got = _fetch(target, {"orthogonal": {}}, (40, 25))
    assert np.abs(got - q.numpy()).max() < 1e-12


@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(100, 30, 0.1), (57, 9, 0.33), (8, 5, 1.0)])
def test_sparse_properties(rows, cols, sparsity, target):
    # torch's test_sparse_default_std: ceil(sparsity * rows) zeros in every column.
    std = 0.5
    w = _fetch(target, {"sparse": {"sparsity": sparsity, "std": std}}, (rows, cols))
    zeros = math.ceil(sparsity * rows)
    assert ((w == 0).sum(axis=0) == zeros).all()
    non_zero = w[w != 0]
    if non_zero.size > 1000:
        assert abs(non_zero.std() - std) < 0.05


@pytest.mark.parametrize(
    ("init", "shape", "field"),
    [
        ({"eye": {}}, (2, 2, 2), "shape"),
        ({"identity": {}}, (4,), "shape"),
        ({"dirac": {}}, (4, 4), "shape"),
        ({"dirac": {"groups": 4}}, (6, 2, 3), "init.dirac.groups"),
        ({"sparse": {"sparsity": 0.1}}, (2, 3, 4), "shape"),
        ({"orthogonal": {}}, (5,), "shape"),
    ],
)
def test_shapes_torch_refuses_are_refused(init, shape, field, target):
    # torch's "only works on 2d / 3-5d" tests, as a server error naming the field.
    request = {"seed": 1, "tensors": [{"name": "w", "shape": list(shape), "init": init}]}
    with pytest.raises(grpc.RpcError) as error:
        weightinit.describe(request, target, timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tensors[0].{field}" in error.value.details()


def test_torch_rules_reach_the_structured_schemes(target):
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Conv2d(4, 4, 3))
    rules = [
        ("0.weight", {"orthogonal": {"gain": 1}}),
        ("1.weight", {"dirac": {}}),
    ]
    import weightinit.torch

    weightinit.torch.init_module(model, 3, target, rules=rules)
    w = model[0].weight.detach().double().numpy()
    assert np.abs(w.T @ w - np.eye(6)).max() < 1e-6
    want = torch.nn.init.dirac_(torch.empty(4, 4, 3, 3))
    assert torch.equal(model[1].weight.detach(), want)
