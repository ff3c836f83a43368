"""weightinit.jax.make_array against the real server, on 8 fake CPU devices (conftest.py)."""

import re
import urllib.request

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp
from conftest import serve
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import weightinit
import weightinit.jax as wj
from weightinit import _blocks

SEED = 424242
SHAPE = (16, 8)
INIT = {"normal": {"std": 0.5}}
# Nothing listens there: a call that validates before dialing never notices.
NOWHERE = "127.0.0.1:1"


def full_tensor(target, name="w", shape=SHAPE, init=INIT, dtype="DTYPE_FLOAT32", **fields):
    """The whole tensor, fetched by the plain client."""
    spec = {"name": name, "shape": list(shape), "init": init, "dtype": dtype, **fields}
    return weightinit.fetch({"seed": SEED, "tensors": [spec]}, target)[name]


def mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


SHARDINGS = {
    "replicated": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P()),
    "rows": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P("x")),
    "rows-cols": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P("x", "y")),
    "cols-rows": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P("y", "x")),
    "cols": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P(None, "y")),
    "both-axes-on-rows": lambda: NamedSharding(mesh((4, 2), ("x", "y")), P(("x", "y"))),
    "8-way-cols": lambda: NamedSharding(mesh((8,), ("d",)), P(None, "d")),
    "2-of-8-devices": lambda: NamedSharding(mesh((2,), ("d",)), P("d")),
    "single-device": lambda: SingleDeviceSharding(jax.devices()[5]),
}


def test_eight_devices():
    assert len(jax.devices()) == 8, "conftest.py sets XLA_FLAGS before jax is imported"


@pytest.mark.parametrize("kind", SHARDINGS)
def test_make_array_equals_the_full_tensor(kind, both):
    """From the server and from "local": each device's block is the full tensor's."""
    target = both
    sharding = SHARDINGS[kind]()
    array = wj.make_array("w", SHAPE, INIT, sharding, seed=SEED, target=target)
    full = full_tensor(target)

    assert array.shape == SHAPE and array.dtype == jnp.float32
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), full)
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_layout_and_fans_reach_the_server(target):
    sharding = NamedSharding(mesh((4,), ("x",)), P(None, None, None, "x"))
    kernel = wj.make_array(
        "k", (3, 3, 4, 8), {"heUniform": {}}, sharding, seed=SEED, target=target, layout="keras"
    )
    np.testing.assert_array_equal(
        np.asarray(kernel),
        full_tensor(target, "k", (3, 3, 4, 8), {"heUniform": {}}, layout="LAYOUT_KERAS"),
    )
    bias = wj.make_array(
        "b", (8,), {"torchDefaultBias": {}}, sharding=SingleDeviceSharding(jax.devices()[0]),
        seed=SEED, target=target, fan_in=36,
    )  # fmt: skip
    expected = full_tensor(target, "b", (8,), {"torchDefaultBias": {}}, fanIn="36")
    np.testing.assert_array_equal(np.asarray(bias), expected)
    assert np.abs(expected).max() <= 1 / 6


def test_bfloat16_is_the_rounded_float32_tensor(target):
    sharding = NamedSharding(mesh((4, 2), ("x", "y")), P("x", "y"))
    array = wj.make_array("w", SHAPE, INIT, sharding, seed=SEED, target=target, dtype=jnp.bfloat16)
    assert array.dtype == jnp.bfloat16
    # The contract: a bfloat16 tensor is the round-to-nearest-even of its float32 copy.
    expected = full_tensor(target).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(array).view(np.uint16), expected.view(np.uint16))


def test_permute_gives_the_transposed_view(target):
    """A torch-shaped [out, in] tensor served as the [in, out] kernel, sharded by columns."""
    sharding = NamedSharding(mesh((4,), ("x",)), P(None, "x"))
    array = wj.make_array("w", SHAPE, INIT, sharding, seed=SEED, target=target, permute=(1, 0))
    assert array.shape == SHAPE[::-1]
    np.testing.assert_array_equal(np.asarray(array), full_tensor(target).T)


def _metrics(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def _sent_bytes(address):
    return int(
        re.search(r"^weightinit_sent_bytes_total (\d+)$", _metrics(address), re.MULTILINE)[1]
    )


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A server of its own, and the address of its Prometheus metrics."""
    log = tmp_path_factory.mktemp("metered") / "stderr.log"
    with serve(log, "--metrics-addr", "127.0.0.1:0") as address:
        # The server logs the metrics address before it prints its listening line.
        metrics = re.search(r"metrics_addr=(\S+)", log.read_text())[1]
        yield address, metrics


@pytest.fixture
def generate_calls(monkeypatch):
    """The requests of every Generate call the package makes (passed on to the real server)."""
    calls = []

    def recording_fetch(request, target, *args, **kwargs):
        calls.append(request)
        return weightinit.fetch(request, target, *args, **kwargs)

    monkeypatch.setattr(_blocks, "fetch", recording_fetch)
    return calls


@pytest.mark.parametrize(
    ("spec", "copies"),
    [(P(), 8), (P("x"), 2), (P(None, "y"), 4), (P("x", "y"), 1)],
)
def test_each_distinct_block_is_fetched_once(spec, copies, metered, generate_calls):
    """8 devices hold `copies` copies of each block; the server sends each block once, all in
    one Generate call."""
    address, metrics = metered
    sharding = NamedSharding(mesh((4, 2), ("x", "y")), spec)
    before = _sent_bytes(metrics)
    array = wj.make_array("w", SHAPE, INIT, sharding, seed=SEED, target=address)

    assert _sent_bytes(metrics) - before == np.prod(SHAPE) * 4
    assert len(generate_calls) == 1
    held = sum(shard.data.size for shard in array.addressable_shards)
    assert held == copies * np.prod(SHAPE)


def test_blocks_that_do_not_tile_go_in_rounds(metered, generate_calls):
    """Blocks of one tensor that leave gaps (what one process of several may hold) are fetched
    alone, never their bounding box; names are unique per request, so they go in rounds."""
    address, metrics = metered
    spec = {"name": "w", "shape": list(SHAPE), "init": INIT, "dtype": "DTYPE_FLOAT32"}
    other = {**spec, "name": "v"}
    top, bottom = ((0, 2), (0, 8)), ((10, 16), (4, 8))
    before = _sent_bytes(metrics)
    got, got_other = _blocks.fetch_blocks(
        SEED, [(spec, [top, bottom, top]), (other, [top])], address
    )

    assert _sent_bytes(metrics) - before == (2 * 8 + 6 * 4 + 2 * 8) * 4
    assert [[t["name"] for t in call["tensors"]] for call in generate_calls] == [["w", "v"], ["w"]]
    full = full_tensor(address)
    np.testing.assert_array_equal(got[top], full[0:2, 0:8])
    np.testing.assert_array_equal(got[bottom], full[10:16, 4:8])
    np.testing.assert_array_equal(got_other[top], full_tensor(address, "v")[0:2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed: must be in 0..2**64-1, got -1"),
        ({"shape": (4, -2)}, "shape: must be a sequence of ints >= 0"),
        ({"permute": (0, 0)}, "permute: must be a permutation of 0..1"),
        ({"dtype": jnp.int32}, "dtype: weightinit serves"),
        ({"dtype": jnp.float64}, "jax_enable_x64"),
        ({"layout": "tf"}, 'layout: must be "torch", "keras" or None'),
        ({"fan_in": -3}, "fanIn: must be an int >= 0"),
    ],
)
def test_bad_arguments_fail_before_anything_is_fetched(kwargs, message):
    arguments = {"seed": SEED, "target": NOWHERE, **kwargs}
    sharding = SingleDeviceSharding(jax.devices()[0])
    shape = arguments.pop("shape", (4, 2))
    with pytest.raises(ValueError, match=re.escape(message)):
        wj.make_array("w", shape, INIT, sharding, **arguments)


def test_bad_arguments_are_value_errors_naming_them():
    with pytest.raises(ValueError, match="sharding of 'w': must be a jax.sharding.Sharding"):
        wj.make_array("w", (4, 2), INIT, "replicated", seed=SEED, target=NOWHERE)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    too_long = NamedSharding(mesh, P("data", "model", None))
    with pytest.raises(ValueError, match=r"sharding of 'w': the PartitionSpec .* has 3 entries"):
        wj.make_array("w", (4, 2), INIT, too_long, seed=SEED, target=NOWHERE)
    # proto3 JSON's own check of the scheme, as a ValueError naming the argument.
    with pytest.raises(ValueError, match=r"init: .*stdd"):
        wj.make_array("w", (4, 2), {"normal": {"stdd": 1}}, None, seed=SEED, target=NOWHERE)
    with pytest.raises(ValueError, match=r"names no concrete mesh .* `with jax.set_mesh\(mesh\)`"):
        wj.make_array("w", (4, 2), INIT, P("data"), seed=SEED, target=NOWHERE)


def test_abstract_mesh_shardings_take_the_mesh_of_set_mesh(target):
    """What jax.set_mesh routes hand out: NamedShardings on an AbstractMesh, PartitionSpecs."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    abstract = NamedSharding(mesh.abstract_mesh, P("data", "model"))
    with pytest.raises(ValueError, match="sharding of 'w': names no concrete mesh"):
        wj.make_array("w", (8, 4), INIT, abstract, seed=SEED, target=NOWHERE)
    with jax.set_mesh(mesh):
        arrays = [
            wj.make_array("w", (8, 4), INIT, sharding, seed=SEED, target=target)
            for sharding in (abstract, P("data", "model"))
        ]
    whole = wj.make_array("w", (8, 4), INIT, None, seed=SEED, target=target)
    assert not whole.committed
    for array in arrays:
        assert array.sharding == NamedSharding(mesh, P("data", "model"))
        np.testing.assert_array_equal(array, whole)
