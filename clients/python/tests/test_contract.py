"""The contract's amendments of this round (../shared/spec: algorithm-v1.md sections 6 and 9,
api-v1.md's TensorSpec.slice), one test each, on the real server and the engine in this process.
"""

import math

import blake3
import grpc
import numpy as np
import pytest
import torch

import weightinit
from weightinit import RequestRefused

TIMEOUT = 30
F32_MAX = float(np.finfo(np.float32).max)


def _request(init, shape, **fields):
    return {"seed": 4, "tensors": [{"name": "w", "shape": list(shape), "init": init, **fields}]}


def _fetch(target, init, shape, **fields):
    return weightinit.fetch(_request(init, shape, **fields), target, timeout=TIMEOUT)["w"]


def test_orthogonal_range_check_leaves_a_margin_past_gain(both):
    # gain x (1 + 2^-20) rounds to infinity in float32: refused, never sent as infinity.
    with pytest.raises(RequestRefused) as raised:
        weightinit.describe(_request({"orthogonal": {"gain": F32_MAX}}, (3, 3)), both)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.field == "tensors[0].dtype"
    assert "not finite in float32" in str(raised.value)
    # Within the margin's reach of the largest float32, but below it: served, and finite.
    below = F32_MAX / (1 + 2.0**-19)
    assert np.isfinite(_fetch(both, {"orthogonal": {"gain": below}}, (3, 3))).all()


def test_dirac_puts_output_channel_o_on_input_channel_o_mod_per_group(both):
    # groups 2 of 4 output channels each, 2 input channels: o % 4 < 2 has a 1, the rest not.
    got = _fetch(both, {"dirac": {"groups": 2}}, (8, 2, 3), dtype="DTYPE_FLOAT64")
    want = torch.nn.init.dirac_(torch.empty(8, 2, 3, dtype=torch.float64), 2).numpy()
    assert np.array_equal(got, want)
    ones = [(o, i) for o in range(8) for i in range(2) if got[o, i, 1] == 1]
    assert ones == [(o, o % 4) for o in range(8) if o % 4 < 2]


def test_sparse_without_sparsity_has_no_zeros(both):
    w = _fetch(both, {"sparse": {}}, (50, 20))
    assert (w != 0).all()
    described = weightinit.describe(_request({"sparse": {}}, (50, 20)), both)["w"]
    assert described["resolved"]["scheme"] == "sparse"


@pytest.mark.parametrize(
    "init",
    [
        {"orthogonal": {}},
        {"eye": {}},
        {"identity": {}},
        {"dirac": {}},
        {"sparse": {"sparsity": 0.5}},
    ],
    ids=lambda init: next(iter(init)),
)
def test_zero_sized_dimensions_are_valid_and_give_no_bytes(init, both):
    shape = (0, 4, 3) if "dirac" in init else (0, 4)
    request = _request(init, shape)
    assert _fetch(both, init, shape).size == 0
    assert weightinit.describe(request, both)["w"]["byteLength"] == "0"
    assert weightinit.digest(request, both)["w"] == blake3.blake3(b"").hexdigest()


def test_a_slice_with_no_kind_is_the_whole_tensor(both):
    init = {"xavierUniform": {}}
    whole = _fetch(both, init, (6, 5))
    assert np.array_equal(_fetch(both, init, (6, 5), slice={}), whole)
    request = _request(init, (6, 5), slice={})
    assert weightinit.describe(request, both)["w"]["outputShape"] == ["6", "5"]


def test_fan_sums_past_2_to_the_64_are_exact_then_rounded_once(both):
    fan_in, fan_out = 2**64 - 1, 2**64 - 3
    request = _request({"xavierNormal": {}}, (2, 2), fanIn=str(fan_in), fanOut=str(fan_out))
    resolved = weightinit.describe(request, both)["w"]["resolved"]
    # Python's integers are exact: the sum, then one rounding to float.
    assert resolved["std"] == math.sqrt(2.0 / float(fan_in + fan_out))
    assert resolved["fanIn"] == str(fan_in) and resolved["fanOut"] == str(fan_out)
