"""weightinit.flax against the real server: Linen (under jax.jit) and NNX models."""

import functools
import re
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import weightinit
import weightinit.flax as wf

SEED = 77
NOWHERE = "127.0.0.1:1"


def scaling(scale, mode="FAN_MODE_FAN_IN", distribution="DISTRIBUTION_TRUNCATED_NORMAL"):
    """A varianceScaling scheme; the defaults are lecun_normal's and he_normal's."""
    return {"varianceScaling": {"scale": scale, "mode": mode, "distribution": distribution}}


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
        # The model: declared zeros and normal(0.02) were served as lecun and 1/sqrt(d).
        x = nn.Dense(5, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(0.5))(
            x
        )
        x = nn.Dense(6, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "uniform"))(x)
        embed = nn.Embed(7, 5, embedding_init=nn.initializers.normal(0.02))(jnp.argmax(x, -1))
        return embed + nn.Embed(7, 5)(jnp.argmax(x, -1))


def test_linen_parameters_get_their_declared_initializers(target):
    model = ConvNet()
    x = jnp.ones((2, 6, 6, 3))
    variables = wf.init_params(functools.partial(model.init, jax.random.key(0), x), SEED, target)

    expected = {
        # nn.Conv's lecun_normal: variance scaling with jax's fans, sent explicitly.
        "Conv_0/kernel": ((3, 3, 3, 4), scaling(1.0), {"fanIn": "27", "fanOut": "36"}),
        "Conv_0/bias": ((4,), {"zeros": {}}, {}),
        "LayerNorm_0/scale": ((4,), {"ones": {}}, {}),
        "LayerNorm_0/bias": ((4,), {"zeros": {}}, {}),
        "Dense_0/kernel": ((144, 5), {"zeros": {}}, {}),
        "Dense_0/bias": ((5,), {"constant": {"value": 0.5}}, {}),
        "Dense_1/kernel": (
            (5, 6),
            scaling(2.0, "FAN_MODE_FAN_OUT", "DISTRIBUTION_UNIFORM"),
            {"fanIn": "5", "fanOut": "6"},
        ),
        "Dense_1/bias": ((6,), {"zeros": {}}, {}),
        "Embed_0/embedding": ((7, 5), {"normal": {"std": 0.02}}, {}),
        # nn.Embed's default variance_scaling(1, "fan_in", "normal", out_axis=0): fan_in = 5.
        "Embed_1/embedding": (
            (7, 5),
            scaling(1.0, distribution="DISTRIBUTION_UNTRUNCATED_NORMAL"),
            {"fanIn": "5", "fanOut": "5"},
        ),
    }
    params = variables["params"]
    assert sorted(f"{layer}/{leaf}" for layer in params for leaf in params[layer]) == sorted(
        expected
    )
    for path, (shape, init, fields) in expected.items():
        layer, leaf = path.split("/")
        value = np.asarray(params[layer][leaf])
        np.testing.assert_array_equal(
            value, fetch_one(target, path, shape, init, **fields), err_msg=path
        )
    assert model.apply(variables, x).shape == (2, 5)
    # Unsharded leaves are uncommitted, as Flax's own init makes them.
    assert not params["Conv_0"]["kernel"].committed


class Oddities(nn.Module):
    kernel_init: Any

    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, kernel_init=self.kernel_init)(x)


def test_initializers_that_cannot_be_served_are_refused_by_path(target):
    x = jnp.ones((1, 4))
    doubled = lambda key, shape, dtype=jnp.float32: (
        2 * nn.initializers.normal(0.02)(key, shape, dtype)
    )
    for init, why in [
        (doubled, "cannot be served"),
        (nn.initializers.variance_scaling(1.0, "fan_in", "normal", batch_axis=1), "whole numbers"),
        (nn.initializers.orthogonal(column_axis=0), "column_axis is 0"),
    ]:
        init_fn = functools.partial(Oddities(init).init, jax.random.key(0), x)
        with pytest.raises(ValueError, match=rf"^Dense_0/kernel: .*{why}.*rules=\[\("):
            wf.init_params(init_fn, SEED, NOWHERE)
    # The rule it names replaces it.
    init_fn = functools.partial(Oddities(doubled).init, jax.random.key(0), x)
    rules = [("Dense_0/kernel", {"normal": {"std": 0.04}})]
    params = wf.init_params(init_fn, SEED, target, rules=rules)["params"]
    expected = fetch_one(target, "Dense_0/kernel", (4, 6), {"normal": {"std": 0.04}})
    np.testing.assert_array_equal(params["Dense_0"]["kernel"], expected)
    # Orthogonal on its last axis is served as weightinit's (Keras's flattening, the same).
    init_fn = functools.partial(
        Oddities(nn.initializers.orthogonal(2.0)).init, jax.random.key(0), x
    )
    kernel = np.asarray(wf.init_params(init_fn, SEED, target)["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(kernel @ kernel.T, 4.0 * np.eye(4), atol=1e-5)


def test_linen_boxes_take_their_mesh_or_say_what_to_pass(target):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    class Boxed(nn.Module):
        mesh: Any

        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"), self.mesh)
            return nn.Dense(8, kernel_init=init)(x)

    x = jnp.ones((1, 16))
    init_fn = functools.partial(Boxed(None).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"^Dense_0/kernel: names no concrete mesh"):
        wf.init_params(init_fn, SEED, NOWHERE)
    with jax.set_mesh(mesh):
        in_context = wf.init_params(init_fn, SEED, target)
    bound = wf.init_params(functools.partial(Boxed(mesh).init, jax.random.key(0), x), SEED, target)
    for variables in (in_context, bound):
        kernel = nn.unbox(variables)["params"]["Dense_0"]["kernel"]
        assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
        np.testing.assert_array_equal(kernel, nn.unbox(in_context)["params"]["Dense_0"]["kernel"])
    # A PartitionSpec longer than the leaf's rank is named, not an IndexError from JAX.
    abstract = {"w": nn.Partitioned(jax.ShapeDtypeStruct((4,), jnp.float32), ("data", "model"))}
    with pytest.raises(ValueError, match=r"^w: the PartitionSpec .* has 2 entries"):
        wf.init_params(abstract, SEED, NOWHERE, mesh=mesh, rules=[("*", {"zeros": {}})])


def test_pytree_leaves_keep_the_shardings_of_the_abstract_leaves(target):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8)))["params"]

    def shard(leaf):
        spec = P(None, "model") if leaf.ndim == 2 else P("data")
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    rules = [("*/kernel", {"lecunNormal": {}}), ("*/bias", {"zeros": {}})]
    sharded = wf.init_params(jax.tree.map(shard, abstract), SEED, target, rules=rules)
    plain = wf.init_params(abstract, SEED, target, rules=rules)
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
    # A tree does not say how its leaves were declared: each needs a rule.
    message = r"no initializer for attn/kernel, gate, pos/table: add rules.*function that builds"
    with pytest.raises(ValueError, match=message):
        wf.init_params(abstract, SEED, NOWHERE)
    with pytest.raises(ValueError, match=r"no initializer for gate, pos/table: add rules"):
        wf.init_params(abstract, SEED, NOWHERE, rules=[("attn/*", {"zeros": {}})])
    # Misspelt schemes and fields are ValueErrors naming the rule (not protobuf's ParseError).
    with pytest.raises(ValueError, match=r"rules\[0\] \('\*'\): .*stdd"):
        wf.init_params(abstract, SEED, NOWHERE, rules=[("*", {"normal": {"stdd": 1.0}})])
    with pytest.raises(ValueError, match=r"rules\[1\]: must be a \(pattern, value\) pair"):
        wf.init_params(abstract, SEED, NOWHERE, rules=[("*", {"zeros": {}}), "x"])
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
    with pytest.raises(ValueError, match="init: .* is not one of jax.nn.initializers"):
        wf.initializer(lambda key, shape, dtype: None, seed=SEED, target=NOWHERE, name="k")


def test_initializer_serves_a_jax_initializer_with_the_fans_of_its_call(target):
    init = wf.initializer(nn.initializers.he_normal(), seed=SEED, target=target, name="qkv")
    model = nn.DenseGeneral((4, 8), kernel_init=init, use_bias=False)
    kernel = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]["kernel"]
    # DenseGeneral calls it on the flat [16, 32] kernel: fan_in 16, not 16 * 4.
    expected = fetch_one(target, "qkv", (16, 32), scaling(2.0), fanIn="16", fanOut="32")
    np.testing.assert_array_equal(np.asarray(kernel), expected.reshape(16, 4, 8))


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs, param_dtype=jnp.bfloat16)])

    def __call__(self, x):
        return self.blocks[0](self.norm(self.fc1(x)))


def test_nnx_from_the_function_that_builds_it(target):
    model = wf.init_params(lambda: Mlp(nnx.Rngs(0)), SEED, target)
    assert isinstance(model, Mlp)

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


class WithState(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


class LinenWithState(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))


def test_state_that_is_no_parameter_is_flax_own(target):
    """RNG state and batch statistics come from Flax's own init (under jax.jit), the
    parameters from the server."""
    model = wf.init_params(lambda: WithState(nnx.Rngs(0)), SEED, target)
    flax_own = WithState(nnx.Rngs(0))
    ours, theirs = (nnx.state(m, nnx.Not(nnx.Param)) for m in (model, flax_own))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(raw(a), raw(b)), ours, theirs)
    assert model.fc.kernel[...].std() > 0 and not np.array_equal(
        model.fc.kernel[...], flax_own.fc.kernel[...]
    )

    x = jnp.ones((2, 4))
    init_fn = functools.partial(LinenWithState().init, jax.random.key(0), x)
    variables = wf.init_params(init_fn, SEED, target)
    np.testing.assert_array_equal(variables["batch_stats"]["BatchNorm_0"]["var"], np.ones(8))
    np.testing.assert_array_equal(variables["params"]["BatchNorm_0"]["scale"], np.ones(8))
    expected = fetch_one(target, "Dense_0/kernel", (4, 8), scaling(1.0), fanIn="4", fanOut="8")
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"], expected)


def raw(array):
    """An array as numpy, an RNG key as its key data."""
    if jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    return np.asarray(array)
