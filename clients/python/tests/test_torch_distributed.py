"""weightinit.torch.init_module() on DTensor parameters: real torch.distributed processes (gloo on
CPU) against the real server. Each rank initializes its model in place (the model's own init:
plain torch layers, a meta-built transformers Qwen2 and Llama, torchtitan's Llama 3 debug model),
every full_tensor() and every buffer must equal a single-process init bit for bit, every rank
must have fetched only its own block, and a forward pass gives the single-process loss."""

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp
from test_torch_models import llama, small_decoder
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

import weightinit
import weightinit.torch as wt

SEED = 31337
TIMEOUT = 60
JOIN_SECONDS = 150


class RecordingClient(weightinit.Client):
    """A real Client that keeps every request it sends and the shape of what came back."""

    def __init__(self, target):
        super().__init__(target, timeout=TIMEOUT)
        self.fetched = []

    def fetch(self, request, out=None, timeout=None):
        arrays = super().fetch(request, out, timeout)
        for spec in request["tensors"]:
            self.fetched.append(
                (spec["name"], spec.get("slice"), tuple(arrays[spec["name"]].shape))
            )
        return arrays


def mlp():
    # Row counts 7 and 5 do not divide by 2 or 4: uneven shards, empty ones on 4 ranks.
    return nn.Sequential(
        nn.Linear(10, 7), nn.LayerNorm(7), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)
    )


def tensor_parallel(mesh_shape):
    model = mlp()
    _tp(_mlp_plan)(model, mesh_shape)
    return model


def uneven():
    return nn.Sequential(nn.Linear(9, 5), nn.Embedding(7, 3, padding_idx=5), nn.Linear(3, 2))


def _distribute(model, mesh, placements):
    for name, placement in placements.items():
        path, _, local = name.rpartition(".")
        layer = model.get_submodule(path)
        value = distribute_tensor(getattr(layer, local).detach(), mesh, placement)
        setattr(layer, local, nn.Parameter(value))
    return model


def distributed_tensors(mesh_shape):
    """Parameters distributed by hand: Shard(0), Shard(1), Replicate, with uneven sizes."""
    placements = {
        "0.weight": [Shard(1)],
        "0.bias": [Shard(0)],
        "1.weight": [Shard(0)],
        "2.weight": [Replicate()],
        "2.bias": [Shard(0)],
    }
    return _distribute(uneven(), init_device_mesh("cpu", mesh_shape), placements)


def nested_shards(mesh_shape):
    """On a 2-D mesh: both mesh dims sharding one tensor dim (left to right), or two dims."""
    placements = {
        "0.weight": [Shard(0), Shard(0)],  # 5 rows: 3 and 2, then 2, 1, 1 and 1
        "0.bias": [Shard(0), Replicate()],
        "1.weight": [Replicate(), Shard(1)],
        "2.weight": [Shard(1), Shard(0)],
        "2.bias": [Shard(0), Shard(0)],  # 2 values: two ranks hold none
    }
    return _distribute(uneven(), init_device_mesh("cpu", mesh_shape), placements)


def ddp(mesh_shape):
    return nn.parallel.DistributedDataParallel(mlp())


def _fsdp2_per_layer(model, layers, mesh):
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _from_meta(build, parallelize):
    """(mesh shape) -> build() on the meta device, parallelize(model, mesh shape), to_empty."""

    def make(mesh_shape):
        with torch.device("meta"):
            model = build()
        parallelize(model, mesh_shape)
        model.to_empty(device="cpu")
        return model

    return make


def _fsdp2(layers):
    """FSDP2 per layer (layers(model)) and at the root."""

    def parallelize(model, shape):
        _fsdp2_per_layer(model, layers(model), init_device_mesh("cpu", shape))

    return parallelize


def _tp(plan):
    """Tensor parallelism by plan(model) ({module path: ColwiseParallel(), ...})."""

    def parallelize(model, shape):
        parallelize_module(model, init_device_mesh("cpu", shape), plan(model))

    return parallelize


def _dp_tp(layers, plan):
    """Tensor parallelism over the mesh's "tp" dim, then FSDP2 over its "dp" dim."""

    def parallelize(model, shape):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], plan(model))
        _fsdp2_per_layer(model, layers(model), mesh["dp"])

    return parallelize


def _megatron(prefixes, colwise, rowwise):
    """Colwise and rowwise linears of every decoder layer, as tensor parallel plans make them."""
    plan = {}
    for prefix in prefixes:
        plan.update({f"{prefix}.{name}": ColwiseParallel() for name in colwise})
        plan.update({f"{prefix}.{name}": RowwiseParallel() for name in rowwise})
    return plan


def qwen2():
    return small_decoder(
        "Qwen2",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=1,
    )


def _decoder_layers(model):
    return model.model.layers


def _qwen2_plan(model):
    return _megatron(
        [f"model.layers.{i}" for i in range(len(model.model.layers))],
        (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ),
        ("self_attn.o_proj", "mlp.down_proj"),
    )


def torchtitan_llama3():
    llama3 = pytest.importorskip("torchtitan.models.llama3")
    return llama3._debugmodel("flex").build()


def _torchtitan_layers(model):
    return model.layers.values()


def _torchtitan_plan(model):
    return _megatron(
        [f"layers.{i}" for i in model.layers],
        ("attention.qkv_linear.wqkv", "feed_forward.w1", "feed_forward.w3"),
        ("attention.wo", "feed_forward.w2"),
    )


def _mlp_plan(model):
    return {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel()}


fsdp2_from_meta = _from_meta(mlp, _fsdp2(lambda model: (model[0], model[2])))
# dp x tp: tensor parallel inside, FSDP2 over the dp dim at the root only.
fsdp2_over_tp_from_meta = _from_meta(mlp, _dp_tp(lambda model: (), _mlp_plan))
# A transformers Llama (tied embeddings), FSDP2 per decoder layer and at the root.
llama_fsdp2_from_meta = _from_meta(llama, _fsdp2(_decoder_layers))
qwen2_fsdp2_from_meta = _from_meta(qwen2, _fsdp2(_decoder_layers))
qwen2_tp_from_meta = _from_meta(qwen2, _tp(_qwen2_plan))
qwen2_dp_tp_from_meta = _from_meta(qwen2, _dp_tp(_decoder_layers, _qwen2_plan))
torchtitan_fsdp2_from_meta = _from_meta(torchtitan_llama3, _fsdp2(_torchtitan_layers))
torchtitan_tp_from_meta = _from_meta(torchtitan_llama3, _tp(_torchtitan_plan))
torchtitan_dp_tp_from_meta = _from_meta(
    torchtitan_llama3, _dp_tp(_torchtitan_layers, _torchtitan_plan)
)


TOKENS = torch.tensor([[5, 17, 2, 88, 40, 3, 61, 9], [1, 1, 30, 72, 11, 50, 4, 93]])


def causal_lm_loss(model):
    return float(model(input_ids=TOKENS, labels=TOKENS).loss)


class Scenario(NamedTuple):
    build: Callable  # (mesh shape) -> the model of one rank
    mesh_shape: tuple
    plain: Callable  # () -> the same model, plain, for the single-process init
    loss: Callable | None = None  # (model) -> a forward pass's loss


# Scenarios by world size: the ranks of one world run them all, one after the other.
SCENARIOS = {
    2: {
        "fsdp2_from_meta": Scenario(fsdp2_from_meta, (2,), mlp),
        "tensor_parallel": Scenario(tensor_parallel, (2,), mlp),
        "ddp": Scenario(ddp, (2,), mlp),
        "llama_fsdp2_from_meta": Scenario(llama_fsdp2_from_meta, (2,), llama),
        "qwen2_fsdp2_from_meta": Scenario(qwen2_fsdp2_from_meta, (2,), qwen2, causal_lm_loss),
        "qwen2_tp_from_meta": Scenario(qwen2_tp_from_meta, (2,), qwen2, causal_lm_loss),
        "torchtitan_fsdp2_from_meta": Scenario(torchtitan_fsdp2_from_meta, (2,), torchtitan_llama3),
        "torchtitan_tp_from_meta": Scenario(torchtitan_tp_from_meta, (2,), torchtitan_llama3),
    },
    4: {
        "distribute_tensor": Scenario(distributed_tensors, (4,), uneven),
        "nested_shards": Scenario(nested_shards, (2, 2), uneven),
        "fsdp2_over_tp_from_meta": Scenario(fsdp2_over_tp_from_meta, (2, 2), mlp),
        "qwen2_fsdp2_from_meta": Scenario(qwen2_fsdp2_from_meta, (4,), qwen2, causal_lm_loss),
        "qwen2_dp_tp_from_meta": Scenario(qwen2_dp_tp_from_meta, (2, 2), qwen2, causal_lm_loss),
        "torchtitan_fsdp2_from_meta": Scenario(torchtitan_fsdp2_from_meta, (4,), torchtitan_llama3),
        "torchtitan_dp_tp_from_meta": Scenario(
            torchtitan_dp_tp_from_meta, (2, 2), torchtitan_llama3
        ),
    },
}


def _process(main, rank, world_size, port, target, directory):
    """One rank's process: joins the gloo world, runs main(rank, world_size, target, directory),
    leaves. A failure leaves its traceback in a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=TIMEOUT)
        )
        try:
            main(rank, world_size, target, directory)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(directory, f"rank{rank}.error"), "w") as file:
            file.write(traceback.format_exc())
        raise
    # Done and saved: leave without the interpreter's teardown. A gloo thread that lets go of a
    # collective's tensors (FSDP2's, in the forward passes) during the teardown aborts the
    # process: torch's, which verify() guards against for its own collectives (its _gather).
    os._exit(0)


def _init_scenarios(rank, world_size, target, directory):
    """For each scenario: build the model, init it, save every full tensor and buffer (by the
    name it is requested under), what it fetched and a forward pass's loss."""
    for scenario, case in SCENARIOS[world_size].items():
        torch.manual_seed(100 + rank)  # every rank starts from different values
        model = case.build(case.mesh_shape)
        with RecordingClient(target) as client:
            wt.init_module(model, SEED, client)
            # What each rank holds, proved against the server's digests of its blocks.
            server = client.digest(wt.build_request(model, SEED))
        tensors = {
            wt._unwrapped_name(model, n): t
            for n, t in (*model.named_parameters(), *model.named_buffers())
        }
        full = {
            n: t.full_tensor() if isinstance(t, DTensor) else t.detach() for n, t in tensors.items()
        }
        saved = {
            "proved": {n: wt.tensor_digest(tensors[n]) == d for n, d in server.items()},
            "full": full,
            "local": {n: tuple(wt._local_tensor(t).shape) for n, t in tensors.items()},
            "dtensors": [n for n, t in tensors.items() if isinstance(t, DTensor)],
            "fetched": client.fetched,
            "loss": case.loss(model) if case.loss else None,
        }
        torch.save(saved, os.path.join(directory, f"{scenario}.rank{rank}.pt"))
    if world_size == 2:
        refused = _refusals(init_device_mesh("cpu", (2,)))
        torch.save(refused, os.path.join(directory, f"refusals.rank{rank}.pt"))


def _refusals(mesh):
    """The ValueError messages of build_request for placements weightinit does not fill."""
    placements = {
        "partial": (DTensor.from_local, [Partial()]),
        # Rows 0, 1, 4, 5 on rank 0: not one block.
        "scattered": (distribute_tensor, [_StridedShard(0, split_factor=2)]),
    }
    messages = {}
    for label, (make, placement) in placements.items():
        layer = nn.Linear(2, 8, bias=False)
        layer.weight = nn.Parameter(make(torch.zeros(8, 2), mesh, placement))
        try:
            wt.build_request(layer, SEED)
        except ValueError as error:
            messages[label] = str(error)
    return messages


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world_size, target, directory, main=_init_scenarios):
    """Runs main(rank, world_size, target, directory) on the ranks of a gloo world, in
    processes of their own; returns {NAME: what each rank saved as NAME.rankR.pt}. A rank that
    fails, or does not finish within JOIN_SECONDS, fails the test."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_process, args=(main, r, world_size, port, target, str(directory)))
        for r in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    errors = sorted(directory.glob("rank*.error"))
    if errors:
        pytest.fail("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {JOIN_SECONDS} s")
    assert [p.exitcode for p in processes] == [0] * world_size
    names = sorted(path.name.removesuffix(".rank0.pt") for path in directory.glob("*.rank0.pt"))
    return {
        name: [torch.load(directory / f"{name}.rank{r}.pt") for r in range(world_size)]
        for name in names
    }


@pytest.fixture(scope="module")
def worlds(target, tmp_path_factory):
    """What every rank of every scenario saved, the worlds run on first use, once."""
    runs = {}

    def get(world_size):
        if world_size not in runs:
            directory = tmp_path_factory.mktemp(f"world{world_size}")
            runs[world_size] = run_world(world_size, target, directory)
        return runs[world_size]

    return get


@pytest.mark.parametrize(
    "world_size, scenario", [(size, name) for size, names in SCENARIOS.items() for name in names]
)
def test_full_tensors_equal_the_single_process_init(world_size, scenario, worlds, target):
    ranks = worlds(world_size)[scenario]
    case = SCENARIOS[world_size][scenario]
    plain = case.plain()
    wt.init_module(plain, SEED, target, timeout=TIMEOUT)
    expected = dict((*plain.named_parameters(), *plain.named_buffers()))
    for rank, saved in enumerate(ranks):
        assert list(saved["full"]) == list(expected), rank
        for name, value in saved["full"].items():
            assert value.dtype == expected[name].dtype
            assert torch.equal(value, expected[name].detach()), f"rank {rank}: {name} differs"
    if scenario != "ddp":
        assert ranks[0]["dtensors"], "the scenario has no DTensor parameters"
    if case.loss is not None:
        loss = case.loss(plain)
        for rank, saved in enumerate(ranks):
            assert saved["loss"] == pytest.approx(loss, rel=1e-5), f"rank {rank}"
    for rank, saved in enumerate(ranks):
        unproved = {name for name, ok in saved["proved"].items() if not ok}
        padded = {n for n in unproved if "embed" in n or n == "1.weight"}  # padding rows zeroed
        assert unproved == padded, f"rank {rank}: {unproved} differ from the server's digests"
    _check_each_rank_fetched_only_its_block(ranks)


def _check_each_rank_fetched_only_its_block(ranks):
    for rank, saved in enumerate(ranks):
        names = [name for name, _, _ in saved["fetched"]]
        assert names == list(saved["proved"]), f"rank {rank} fetched {names}"
        for name, piece, shape in saved["fetched"]:
            assert shape == saved["local"][name], f"rank {rank} fetched {shape} of {name}"
            if shape != tuple(saved["full"][name].shape):
                assert "dims" in piece, (rank, name, piece)


def test_placements_that_give_no_single_block_are_refused(worlds):
    for messages in worlds(2)["refusals"]:
        assert "weight: placement Partial" in messages["partial"]
        assert "is not supported: weightinit fills Shard and Replicate" in messages["partial"]
        assert "not one contiguous range; redistribute" in messages["scattered"]
