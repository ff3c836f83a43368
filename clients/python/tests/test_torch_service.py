"""weightinit.torch.init_module() against the real server."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import weightinit
import weightinit.torch as wt

SEED = 20240601
TIMEOUT = 60


def mlp():
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def _digests(module):
    return {name: wt.tensor_digest(param) for name, param in module.named_parameters()}


@pytest.mark.parametrize("build", [mlp, convnet])
def test_parameters_match_the_servers_digests(build, target):
    model = build()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    returned = wt.init_module(model, SEED, target, timeout=TIMEOUT)
    assert all(returned[name] is param for name, param in model.named_parameters())

    server = weightinit.digest(wt.build_request(model, SEED), target, timeout=TIMEOUT)
    digests = _digests(model)
    assert {name: digests[name] for name in server} == server
    for name, param in model.named_parameters():
        if name not in server:  # a norm's constants, written rather than served
            assert torch.all(param == param.flatten()[0]), name
        assert param.requires_grad
        if param.numel() > 1 and param.dim() > 1:
            assert not torch.equal(param, before[name]), f"{name} was not overwritten"


class RecordingClient(weightinit.Client):
    """A real Client that remembers the destinations each fetch was given."""

    def __init__(self, target):
        super().__init__(target, timeout=TIMEOUT)
        self.buffers = {}

    def fetch(self, request, out=None, timeout=None):
        self.buffers.update(out or {})
        return super().fetch(request, out, timeout)


def test_cpu_parameters_receive_the_chunks_in_place(target):
    """Every chunk goes straight into the parameter's memory: fetch gets views of them all."""
    model = mlp().to(torch.bfloat16)
    with RecordingClient(target) as client:
        wt.init_module(model, SEED, client)
    assert list(client.buffers) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert client.buffers[name].ctypes.data == param.data_ptr(), name
    assert _digests(model) == weightinit.digest(wt.build_request(model, SEED), target)


def test_values_follow_the_pytorch_defaults(target):
    model = convnet()
    wt.init_module(model, SEED, target, timeout=TIMEOUT)
    conv, bn, linear = model[0], model[1], model[4]
    for layer, fan_in in ((conv, 3 * 3 * 3), (linear, 16 * 8 * 8)):
        bound = 1 / fan_in**0.5  # kaiming_uniform(a=sqrt(5)) and the bias bound coincide
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))


CHILD = """
import json, sys, torch, torch.nn as nn
import weightinit.torch as wt
torch.manual_seed(int(sys.argv[2]))  # each process starts from different torch values
model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
wt.init_module(model, int(sys.argv[3]), sys.argv[1], timeout=60)
print(json.dumps({n: wt.tensor_digest(p) for n, p in model.named_parameters()}))
"""


def test_separate_processes_get_identical_parameters(target):
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, target, str(torch_seed), str(SEED)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for torch_seed in (1, 2)
    ]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    first, second = (json.loads(output) for output in outputs)
    model = mlp()
    wt.init_module(model, SEED, target, timeout=TIMEOUT)
    assert first == second == _digests(model)


def _sharding_model():
    # Row counts 7, 7 and 3 do not divide by 4: uneven shards, and an empty one for the bias.
    return nn.Sequential(nn.Linear(10, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.Conv1d(3, 5, 2))


def test_four_ranks_shards_concatenate_to_the_full_tensors(target):
    full = _sharding_model()
    wt.init_module(full, SEED, target, timeout=TIMEOUT)

    untouched = _sharding_model()
    before = {name: param.detach().clone() for name, param in untouched.named_parameters()}
    shards = [
        wt.init_module(untouched, SEED, target, rank=rank, world_size=4, timeout=TIMEOUT)
        for rank in range(4)
    ]
    assert shards[3]["2.bias"].shape == (0,)
    for name, param in full.named_parameters():
        joined = torch.cat([shard[name] for shard in shards], dim=0)
        assert joined.dtype == param.dtype and torch.equal(joined, param.detach()), name
        assert torch.equal(dict(untouched.named_parameters())[name], before[name]), (
            f"{name} was modified"
        )


def test_custom_plan_and_dtype(target):
    """A plan splitting the weights' last dim in two; bfloat16 shards of a float32 model."""
    full = _sharding_model()
    wt.init_module(full, SEED, target, timeout=TIMEOUT)

    def plan(rank):
        def slices(name, param):
            if not name.endswith("weight") or param.dim() < 2:
                return None
            dim = param.dim() - 1
            return {"shard": {"dim": dim, "index": rank, "count": 2}}

        return slices

    shards = [
        wt.init_module(
            _sharding_model(), SEED, target, plan=plan(rank), dtype=torch.bfloat16, timeout=TIMEOUT
        )
        for rank in range(2)
    ]
    for name, param in full.named_parameters():
        parts = [shard[name] for shard in shards]
        assert all(part.dtype == torch.bfloat16 for part in parts)
        joined = (
            torch.cat(parts, dim=-1) if name.endswith("weight") and param.dim() >= 2 else parts[0]
        )
        # Every bfloat16 value is the rounding of the float32 one (algorithm v1, section 4).
        assert torch.equal(joined, param.detach().to(torch.bfloat16)), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_models_in_other_dtypes(dtype, target):
    reference = mlp()
    wt.init_module(reference, SEED, target, timeout=TIMEOUT)
    model = mlp().to(dtype)
    wt.init_module(model, SEED, target, timeout=TIMEOUT)
    assert _digests(model) == weightinit.digest(
        wt.build_request(model, SEED), target, timeout=TIMEOUT
    )
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if dtype == torch.float64:
            assert torch.equal(param.to(torch.float32), ref), name  # f32 = RNE(f64)
        else:
            assert torch.equal(param, ref.to(dtype)), name  # f16/bf16 = RNE(f32)


def test_generating_in_another_dtype_casts_into_the_parameters(target):
    reference = mlp()
    wt.init_module(reference, SEED, target, timeout=TIMEOUT)
    model = mlp()
    wt.init_module(model, SEED, target, dtype=torch.float64, timeout=TIMEOUT)
    for param, ref in zip(model.parameters(), reference.parameters()):
        assert torch.equal(param, ref)


def test_non_contiguous_parameters_are_copied(target):
    model = mlp()
    model[0].weight = nn.Parameter(torch.empty(784, 256).t())  # same shape, transposed memory
    wt.init_module(model, SEED, target, timeout=TIMEOUT)
    reference = mlp()
    wt.init_module(reference, SEED, target, timeout=TIMEOUT)
    assert torch.equal(model[0].weight, reference[0].weight)
