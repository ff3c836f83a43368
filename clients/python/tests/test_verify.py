"""verify(): every process hashes what it holds, compares it with what the request serves and,
under torch.distributed, agrees with the other ranks on one report that names each tensor that
differs and where. Real gloo worlds of 2 and 4 processes (FSDP2 and tensor parallel) against the
real server; the JAX twin on 8 CPU devices."""

import os

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import weightinit.torch as wt
from weightinit._verify import WeightsDiffer, verify, verify_arrays

SEED = 4242
CHANGED = "0.weight"  # 7 rows: every rank of 2 or 4 holds some of it, sharded by rows


def _scenarios(world_size):
    """{label: model builder} for this world: FSDP2 and tensor parallel, both from the
    distributed suite."""
    from test_torch_distributed import fsdp2_from_meta, fsdp2_over_tp_from_meta, tensor_parallel

    scenarios = {
        "fsdp2": lambda: fsdp2_from_meta((world_size,)),
        "tensor_parallel": lambda: tensor_parallel((world_size,)),
    }
    if world_size == 4:
        scenarios["fsdp2_over_tp"] = lambda: fsdp2_over_tp_from_meta((2, 2))
    return scenarios


def _verify_rank(rank, world_size, target, directory):
    """Per scenario: init, verify (must pass), change one element of the last rank's block of
    CHANGED, verify again; saves both outcomes as every rank saw them. Then every rank passes
    a seed of its own, which every rank must refuse."""
    for label, build in _scenarios(world_size).items():
        model = build()
        wt.init_module(model, SEED, target)
        clean = verify(model, SEED, target)
        if rank == world_size - 1:
            with torch.no_grad():
                model.get_parameter(CHANGED).to_local().view(-1)[0] += 1
        try:
            verify(model, SEED, target)
            caught = None
        except WeightsDiffer as error:
            caught = {"message": str(error), "differing": error.report.differing()}
        saved = {"clean": (clean.ok, clean.ranks, clean.names), "caught": caught}
        torch.save(saved, os.path.join(directory, f"{label}.rank{rank}.pt"))
    try:
        verify(model, SEED + rank, target)
        refused = None
    except ValueError as error:
        refused = str(error)
    torch.save(refused, os.path.join(directory, f"seeds.rank{rank}.pt"))


@pytest.mark.parametrize("world_size", [2, 4])
def test_verify_names_the_changed_tensor_and_rank_on_every_rank(world_size, target, tmp_path):
    from test_torch_distributed import run_world

    results = run_world(world_size, target, tmp_path, main=_verify_rank)
    for rank, refused in enumerate(results.pop("seeds")):
        assert refused is not None and "the ranks passed different seeds" in refused, rank
    assert sorted(results) == sorted(_scenarios(world_size))
    for label, ranks in results.items():
        for rank, saved in enumerate(ranks):
            ok, ranks_checked, names = saved["clean"]
            assert ok and ranks_checked == world_size and CHANGED in names, (label, rank)
            caught = saved["caught"]
            assert caught is not None, f"{label}: rank {rank} did not raise"
            # Every rank raises the same report: only CHANGED, only on the last rank.
            assert caught == ranks[0]["caught"], (label, rank)
            assert caught["differing"] == {CHANGED: [world_size - 1]}, caught["message"]
            assert f"{CHANGED} on rank(s) {world_size - 1}\n" in caught["message"]


# A rank of a two-rank gloo world that ends with verify(), as scripts do.
VERIFY_LAST = """
import sys
import torch.distributed as dist
from torch import nn
import weightinit.torch as wt
from weightinit._verify import verify

dist.init_process_group("gloo", init_method=sys.argv[2], rank=int(sys.argv[1]), world_size=2)
model = nn.Linear(8, 4)
wt.init_module(model, 42, "local")
verify(model, 42, "local")
"""


def test_ranks_exit_cleanly_right_after_verify():
    """gloo's threads let go of verify's gathered tensors after it returns; done during the
    interpreter's teardown, that aborted about one two-rank run in three (SIGABRT, "terminate
    called without an active exception"), so 12 runs all but always caught it."""
    import subprocess
    import sys

    from test_torch_distributed import _free_port

    # Plain processes, not run_world's: multiprocessing's own teardown after the rank's work
    # gives gloo's threads time, and the abort did not show there once in 12 runs.
    for run in range(12):
        rendezvous = f"tcp://127.0.0.1:{_free_port()}"
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", VERIFY_LAST, str(rank), rendezvous],
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
            )
            for rank in range(2)
        ]
        try:
            for rank, process in enumerate(ranks):
                _, stderr = process.communicate(timeout=120)
                assert process.returncode == 0, f"run {run}, rank {rank}: {stderr}"
        finally:
            for process in ranks:
                process.kill()


def _mlp():
    return nn.Sequential(nn.Linear(10, 7), nn.Embedding(5, 3, padding_idx=1), nn.Linear(3, 2))


@pytest.mark.parametrize("where", ["local", "server"])
def test_verify_in_one_process(where, target):
    target = "local" if where == "local" else target
    model = _mlp()
    wt.init_module(model, SEED, target, dtype=torch.float64)
    report = verify(model, SEED, target, dtype=torch.float64)
    assert report.ok and report.names == ("0.weight", "0.bias", "1.weight", "2.weight", "2.bias")
    assert "all 5 tensors on 1 rank(s)" in str(report)

    with pytest.raises(WeightsDiffer) as caught:
        verify(model, SEED + 1, target, dtype=torch.float64)
    assert set(caught.value.report.differing()) == set(report.names)

    with torch.no_grad():
        model[2].bias[1] = 0.5
    report = verify(model, SEED, target, check=False, dtype=torch.float64)
    assert report.differing() == {"2.bias": [0]}
    (difference,) = report.differences
    assert difference.held == wt.tensor_digest(model[2].bias)
    assert len(difference.expected) == 64 and difference.expected != difference.held


def test_verify_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match="0.weight, 0.bias.* are on the meta device"):
        verify(model, SEED, "local")


def test_verify_arrays_names_the_device_whose_shard_differs(both):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import weightinit.jax as wj

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    specs = [
        {"name": "w", "shape": [8, 6], "init": {"xavierUniform": {}}, "dtype": "DTYPE_BFLOAT16"},
        {"name": "b", "shape": [6], "init": {"uniform": {}}, "dtype": "DTYPE_FLOAT32"},
    ]
    shardings = [NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P())]
    request = {"seed": SEED, "tensors": specs}
    w, b = wj.make_arrays(SEED, list(zip(specs, shardings)), both)
    params = {"dense": {"kernel": w}, "bias": b}  # tree order: bias, dense/kernel
    reordered = {"seed": SEED, "tensors": specs[::-1]}
    report = verify_arrays(params, reordered, both)
    assert report.ok and report.names == ("b", "w")

    # b is replicated on all 8 devices: one device's copy changed is named with its device.
    shards = [s.data for s in b.addressable_shards]
    bad_device = b.addressable_shards[5].device
    shards[5] = jax.device_put(shards[5].at[2].add(1.0), bad_device)
    changed = jax.make_array_from_single_device_arrays(b.shape, b.sharding, shards)
    with pytest.raises(WeightsDiffer) as caught:
        verify_arrays({"dense": {"kernel": w}, "bias": changed}, reordered, both)
    report = caught.value.report
    assert report.differing() == {"b": [0]}
    assert [d.device for d in report.differences] == [str(bad_device)]

    with pytest.raises(ValueError, match="2 leaves, but the request has 1 tensors"):
        verify_arrays(params, {"seed": SEED, "tensors": specs[:1]}, both)
    with pytest.raises(
        ValueError, match=r"the leaf for .w. is float32\[6\], the request makes bfloat16\[8, 6\]"
    ):
        verify_arrays(params, request, both)
