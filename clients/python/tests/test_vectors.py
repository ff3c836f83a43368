"""Every case of the public vectors, fetched from the real server and generated in this process
("local"), plus its Digest and Describe, and the errors a bad request gets from either."""

import json

import blake3
import grpc
import numpy as np
import pytest
from conftest import REPO

import weightinit

CASES = json.loads((REPO / "tests" / "data" / "vectors-v1.json").read_text())["cases"]
TIMEOUT = 60


def _raw(value):
    """The bytes of a fetched tensor (a numpy array, or a torch tensor for bfloat16)."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    import torch

    return value.view(torch.int16).numpy().tobytes()


def _floats(value, count):
    """The first `count` elements as Python floats (bfloat16 bits widened exactly)."""
    if not isinstance(value, np.ndarray):
        return value.reshape(-1)[:count].float().tolist()
    flat = value.reshape(-1)[:count]
    if flat.dtype == np.uint16:
        flat = (flat.astype("<u4") << 16).view("<f4")
    return flat.astype(np.float64).tolist()


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_vector_case(case, both):
    target = both
    result = weightinit.fetch(case["request"], target, timeout=TIMEOUT)
    assert list(result) == [expect["name"] for expect in case["expect"]]
    for expect in case["expect"]:
        raw = _raw(result[expect["name"]])
        assert len(raw) == expect["byte_length"], expect["name"]
        assert blake3.blake3(raw).hexdigest() == expect["blake3"], expect["name"]
        first = expect["first_values"]
        assert _floats(result[expect["name"]], len(first)) == first, expect["name"]

    digests = weightinit.digest(case["request"], target, timeout=TIMEOUT)
    assert digests == {expect["name"]: expect["blake3"] for expect in case["expect"]}

    headers = weightinit.describe(case["request"], target, timeout=TIMEOUT)
    for expect in case["expect"]:
        header = headers[expect["name"]]
        assert int(header["byteLength"]) == expect["byte_length"]
        assert header["dtype"] != "DTYPE_UNSPECIFIED" and header["resolved"]["scheme"]


def test_small_chunks_into_caller_buffers(both):
    """Many chunks per tensor, written straight into preallocated arrays."""
    target = both
    case = CASES[0]
    request = dict(case["request"], chunkBytes=1000)
    headers = weightinit.describe(request, target, timeout=TIMEOUT)
    out = {
        name: np.empty([int(n) for n in h["outputShape"]], np.float32)
        for name, h in headers.items()
    }
    result = weightinit.fetch(request, target, out=out, timeout=TIMEOUT)
    for expect in case["expect"]:
        assert result[expect["name"]] is out[expect["name"]]
        assert blake3.blake3(out[expect["name"]].tobytes()).hexdigest() == expect["blake3"]


BAD_REQUESTS = {
    "no-tensors": {"seed": 1, "tensors": []},
    "fanless-xavier": {
        "seed": 1,
        "tensors": [{"name": "b", "shape": [10], "init": {"xavierUniform": {}}}],
    },
    "no-init": {"seed": 1, "tensors": [{"name": "w", "shape": [2, 2]}]},
    "low-above-high": {
        "seed": 1,
        "tensors": [{"name": "u", "shape": [3], "init": {"uniform": {"low": 1, "high": 0}}}],
    },
    "unknown-algorithm": {
        "seed": 1,
        "algorithm": 9,
        "tensors": [{"name": "z", "shape": [1], "init": {"zeros": {}}}],
    },
}


@pytest.mark.parametrize("request_", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
@pytest.mark.parametrize(
    "call", [weightinit.fetch, weightinit.digest, weightinit.describe], ids=lambda f: f.__name__
)
def test_bad_request_is_invalid_argument(call, request_, both):
    with pytest.raises(weightinit.RequestRefused) as raised:
        call(request_, both, timeout=TIMEOUT)
    error = raised.value
    assert isinstance(error, ValueError) and isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{error.field}: ") and error.field


def test_both_targets_refuse_alike(target):
    """The local engine's refusal is the server's, word for word."""
    request = BAD_REQUESTS["fanless-xavier"]
    errors = []
    for where in ("local", target):
        with pytest.raises(weightinit.RequestRefused) as raised:
            weightinit.describe(request, where, timeout=TIMEOUT)
        errors.append(raised.value)
    assert errors[0].field == errors[1].field == "tensors[0].fan_in"
    assert errors[0].details() == errors[1].details()
