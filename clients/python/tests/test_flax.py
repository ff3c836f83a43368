"""weightinit.flax against the real server: Linen (under jax.jit) and NNX models."""

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import weightinit
import weightinit.flax as wf

SEED = 77
NOWHERE = "127.0.0.1:1"


def fetch_one(target, name, shape, init, seed=SEED, **fields):
    """One whole tensor, fetched by the plain client, [*kernel, in, out] fans."""
    spec = {"name": name, "shape": list(shape), "init": init, "layout": "LAYOUT_KERAS", **fields}
    return weightinit.fetch({"seed": seed, "tensors": [spec]}, target)[name]


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.LayerNorm()(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(5, kernel_init=nn.with_partitioning(nn.initializers.zeros, (None, "m")))(x)
        return nn.Embed(7, 5)(jnp.argmax(x, -1))


def test_linen_params_get_flax_defaults_by_name(target):
    model = ConvNet()
    x = jnp.ones((2, 6, 6, 3))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = wf.init_params(abstract, SEED, target)

    expected = {
        "Conv_0/kernel": ((3, 3, 3, 4), {"lecunNormal": {}}, {}),
        "Conv_0/bias": ((4,), {"zeros": {}}, {}),
        "LayerNorm_0/scale": ((4,), {"ones": {}}, {}),
        "LayerNorm_0/bias": ((4,), {"zeros": {}}, {}),
        "Dense_0/kernel": ((144, 5), {"lecunNormal": {}}, {}),
        "Dense_0/bias": ((5,), {"zeros": {}}, {}),
        # nn.Embed: normal with std 1/sqrt(features).
        "Embed_0/embedding": (
            (7, 5),
            {"varianceScaling": {"distribution": "DISTRIBUTION_UNTRUNCATED_NORMAL"}},
            {"fanIn": "5"},
        ),
    }
    # The nn.Partitioned box stays, around the new value.
    assert isinstance(params["Dense_0"]["kernel"], nn.Partitioned)
    assert params["Dense_0"]["kernel"].names == (None, "m")
    unboxed = nn.unbox(params)
    for path, (shape, init, fields) in expected.items():
        layer, leaf = path.split("/")
        value = np.asarray(unboxed[layer][leaf])
        np.testing.assert_array_equal(value, fetch_one(target, path, shape, init, **fields))
    assert np.asarray(unboxed["Conv_0"]["kernel"]).std() > 0
    assert model.apply({"params": params}, x).shape == (2, 5)


def test_linen_params_keep_the_shardings_of_the_abstract_leaves(target):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8)))["params"]

    def shard(leaf):
        spec = P(None, "model") if leaf.ndim == 2 else P("data")
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    sharded = wf.init_params(jax.tree.map(shard, abstract), SEED, target)
    plain = wf.init_params(abstract, SEED, target)
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        assert leaf.sharding.spec == (P(None, "model") if leaf.ndim == 2 else P("data")), path
        assert len(leaf.addressable_shards) == 8
    jax.tree.map(np.testing.assert_array_equal, sharded, plain)


def test_rules_and_names(target):
    model = nn.Dense(3)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4)))["params"]
    rules = [
        ("kernel", {"heUniform": {}}),
        (re.compile("bias$"), {"init": {"torchDefaultBias": {}}, "fanIn": "4"}),
    ]
    params = wf.init_params(abstract, SEED, target, rules=rules, names={"kernel": "fc.k"})
    np.testing.assert_array_equal(
        params["kernel"], fetch_one(target, "fc.k", (4, 3), {"heUniform": {}})
    )
    np.testing.assert_array_equal(
        params["bias"], fetch_one(target, "bias", (3,), {"torchDefaultBias": {}}, fanIn="4")
    )


def test_leaves_without_an_init_are_named_before_anything_is_fetched():
    abstract = {"attn": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
                "pos": {"table": jax.ShapeDtypeStruct((9, 4), jnp.float32)},
                "gate": jax.ShapeDtypeStruct((), jnp.float32)}  # fmt: skip
    with pytest.raises(ValueError, match=r"no initializer for gate, pos/table: add rules"):
        wf.init_params(abstract, SEED, NOWHERE)
    with pytest.raises(ValueError, match=r"names: no parameter has the paths \['atn/kernel'\]"):
        wf.init_params(abstract, SEED, NOWHERE, rules=[("*", {"zeros": {}})], names={"atn/kernel": "x"})  # fmt: skip
    twice = {"attn/kernel": "x", "gate": "x"}
    with pytest.raises(ValueError, match=r"these are used twice: \['x'\]"):
        wf.init_params(abstract, SEED, NOWHERE, rules=[("*", {"zeros": {}})], names=twice)
    with pytest.raises(ValueError, match='like: must be None or "torch"'):
        wf.init_params(abstract, SEED, NOWHERE, like="keras")


class TwoLayers(nn.Module):
    target: str

    @nn.compact
    def __call__(self, x):
        fc1 = wf.initializer({"heNormal": {}}, seed=SEED, target=self.target, name="fc1.kernel")
        fc2 = wf.initializer({"heNormal": {}}, seed=SEED, target=self.target, name="fc2.kernel")
        bias = wf.initializer(
            {"init": {"torchDefaultBias": {}}, "fanIn": "16"},
            seed=SEED,
            target=self.target,
            name="fc2.bias",
        )
        x = nn.relu(nn.Dense(16, kernel_init=fc1)(x))
        return nn.Dense(16, kernel_init=fc2, bias_init=bias)(x)


def test_initializer_works_inside_jit(target):
    model = TwoLayers(target)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 16)))["params"]

    fc1 = fetch_one(target, "fc1.kernel", (16, 16), {"heNormal": {}})
    fc2 = fetch_one(target, "fc2.kernel", (16, 16), {"heNormal": {}})
    np.testing.assert_array_equal(params["Dense_0"]["kernel"], fc1)
    np.testing.assert_array_equal(params["Dense_1"]["kernel"], fc2)
    np.testing.assert_array_equal(
        params["Dense_1"]["bias"],
        fetch_one(target, "fc2.bias", (16,), {"torchDefaultBias": {}}, fanIn="16"),
    )
    # Same shapes, same scheme: different names keep the two layers apart.
    assert not np.array_equal(fc1, fc2)


def test_initializer_under_eval_shape_fetches_nothing():
    abstract = jax.eval_shape(TwoLayers(NOWHERE).init, jax.random.key(0), jnp.ones((1, 16)))
    assert abstract["params"]["Dense_1"]["kernel"].shape == (16, 16)


def test_initializer_needs_a_name_and_a_valid_init():
    with pytest.raises(TypeError, match="name"):
        wf.initializer({"heNormal": {}}, seed=SEED, target=NOWHERE)
    with pytest.raises(ValueError, match="name: must be a non-empty str"):
        wf.initializer({"heNormal": {}}, seed=SEED, target=NOWHERE, name="")
    with pytest.raises(ValueError, match=r"init: \['heNormall'\] are neither"):
        wf.initializer({"heNormall": {}}, seed=SEED, target=NOWHERE, name="k")


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs, param_dtype=jnp.bfloat16)])

    def __call__(self, x):
        return self.blocks[0](self.norm(self.fc1(x)))


def test_nnx_from_an_abstract_model(target):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Mlp(nnx.Rngs(0))))
    model = nnx.merge(graphdef, wf.init_params(abstract, SEED, target))

    np.testing.assert_array_equal(
        model.fc1.kernel[...], fetch_one(target, "fc1/kernel", (6, 8), {"lecunNormal": {}})
    )
    np.testing.assert_array_equal(model.fc1.bias[...], np.zeros(8, np.float32))
    np.testing.assert_array_equal(model.norm.scale[...], np.ones(8, np.float32))
    kernel = model.blocks[0].kernel[...]
    assert kernel.dtype == jnp.bfloat16
    expected = fetch_one(target, "blocks/0/kernel", (8, 8), {"lecunNormal": {}})
    np.testing.assert_array_equal(np.asarray(kernel), expected.astype(jnp.bfloat16))
    assert model(jnp.ones((2, 6))).shape == (2, 8)


def test_nnx_update_in_place(target):
    model = Mlp(nnx.Rngs(0))
    params = wf.init_params(nnx.state(model, nnx.Param), SEED, target, rules=[("*", {"ones": {}})])
    nnx.update(model, params)
    assert all(np.all(np.asarray(leaf) == 1) for leaf in jax.tree.leaves(nnx.state(model)))
