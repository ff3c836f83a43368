"""like="torch": a PyTorch, a Flax (Linen and NNX) and a Keras model of the same architecture
hold exactly the same matrices, each in its own framework's layout."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
keras = pytest.importorskip("keras")
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import weightinit.flax as wf
import weightinit.keras as wk
import weightinit.torch as wt

SEED = 2718

# Framework paths -> torch parameter names of nn.Sequential(Linear(6, 8), ReLU(), Linear(8, 3)).
LINEN_MLP = {
    "layers_0/kernel": "0.weight",
    "layers_0/bias": "0.bias",
    "layers_2/kernel": "2.weight",
    "layers_2/bias": "2.bias",
}
NNX_MLP = {
    "fc1/kernel": "0.weight",
    "fc1/bias": "0.bias",
    "fc2/kernel": "2.weight",
    "fc2/bias": "2.bias",
}
KERAS_MLP = {
    "mlp/fc1/kernel": "0.weight",
    "mlp/fc1/bias": "0.bias",
    "mlp/fc2/kernel": "2.weight",
    "mlp/fc2/bias": "2.bias",
}


@pytest.fixture(scope="module")
def torch_mlp(target):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    wt.init_module(model, SEED, target)
    return model


def as_numpy(parameter):
    return parameter.detach().numpy()


def assert_same_mlp(torch_mlp, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias):
    """A [in, out] kernel equals the transposed torch [out, in] weight, bit for bit."""
    np.testing.assert_array_equal(np.asarray(fc1_kernel), as_numpy(torch_mlp[0].weight).T)
    np.testing.assert_array_equal(np.asarray(fc1_bias), as_numpy(torch_mlp[0].bias))
    np.testing.assert_array_equal(np.asarray(fc2_kernel), as_numpy(torch_mlp[2].weight).T)
    np.testing.assert_array_equal(np.asarray(fc2_bias), as_numpy(torch_mlp[2].bias))


def test_linen_mlp(torch_mlp, target):
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = wf.init_params(abstract, SEED, target, like="torch", names=LINEN_MLP)

    layers = params["layers_0"], params["layers_2"]
    assert_same_mlp(torch_mlp, *(leaf for d in layers for leaf in (d["kernel"], d["bias"])))
    # Same weights, same function: the outputs agree to float32 rounding.
    with torch.no_grad():
        expected = torch_mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_linen_mlp_sharded(torch_mlp, target):
    """Sharded kernels: each block is a slice of the permuted view, still the torch matrix."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 6)))["params"]

    def shard(leaf):
        spec = P("model") if leaf.shape[0] % 2 == 0 else P()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    params = wf.init_params(
        jax.tree.map(shard, abstract), SEED, target, like="torch", names=LINEN_MLP
    )
    assert params["layers_0"]["kernel"].sharding.spec == P("model")
    layers = params["layers_0"], params["layers_2"]
    assert_same_mlp(torch_mlp, *(leaf for d in layers for leaf in (d["kernel"], d["bias"])))


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)


def test_nnx_mlp(torch_mlp, target):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))))
    model = nnx.merge(graphdef, wf.init_params(abstract, SEED, target, like="torch", names=NNX_MLP))
    assert_same_mlp(torch_mlp, model.fc1.kernel[...], model.fc1.bias[...],
                    model.fc2.kernel[...], model.fc2.bias[...])  # fmt: skip


def test_keras_mlp(torch_mlp, target):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(3, name="fc2"),
        ],
        name="mlp",
    )
    wk.init_model(model, SEED, target, like="torch", names=KERAS_MLP)
    fc1, fc2 = model.get_layer("fc1"), model.get_layer("fc2")
    assert_same_mlp(torch_mlp, *(w.value for w in (fc1.kernel, fc1.bias, fc2.kernel, fc2.bias)))


@pytest.fixture(scope="module")
def torch_conv(target):
    model = torch.nn.Conv2d(3, 5, (3, 2))
    wt.init_module(model, SEED, target)
    # torch [out, in, kh, kw] -> [kh, kw, in, out], the Flax and Keras kernel layout.
    return as_numpy(model.weight).transpose(2, 3, 1, 0), as_numpy(model.bias)


def test_linen_conv(torch_conv, target):
    model = nn.Conv(5, (3, 2))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 6, 6, 3)))["params"]
    params = wf.init_params(
        abstract, SEED, target, like="torch", names={"kernel": "weight", "bias": "bias"}
    )
    np.testing.assert_array_equal(np.asarray(params["kernel"]), torch_conv[0])
    np.testing.assert_array_equal(np.asarray(params["bias"]), torch_conv[1])


def test_keras_conv(torch_conv, target):
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), keras.layers.Conv2D(5, (3, 2), name="c")], name="net"
    )
    names = {"net/c/kernel": "weight", "net/c/bias": "bias"}
    wk.init_model(model, SEED, target, like="torch", names=names)
    layer = model.get_layer("c")
    np.testing.assert_array_equal(np.asarray(layer.kernel.value), torch_conv[0])
    np.testing.assert_array_equal(np.asarray(layer.bias.value), torch_conv[1])


def test_layers_without_a_torch_counterpart_need_rules():
    inputs = keras.Input((4, 6))
    outputs = keras.layers.MultiHeadAttention(2, 3, name="attn")(inputs, inputs)
    model = keras.Model(inputs, outputs, name="t")
    with pytest.raises(ValueError, match=r"no initializer for attn/query/kernel \(EinsumDense\)"):
        wk.init_model(model, SEED, "127.0.0.1:1", like="torch")
