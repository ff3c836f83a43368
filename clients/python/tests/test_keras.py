"""weightinit.keras against the real server (Keras 3 on the JAX backend, see conftest.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import jax
import jax.numpy as jnp
from conftest import serve
from jax.sharding import PartitionSpec as P

import weightinit
import weightinit.keras as wk

SEED = 31337
NOWHERE = "127.0.0.1:1"


def fetch_one(target, name, shape, init, **fields):
    """One whole tensor, fetched by the plain client, [*kernel, in, out] fans."""
    spec = {"name": name, "shape": list(shape), "init": init, "layout": "LAYOUT_KERAS", **fields}
    return weightinit.fetch({"seed": SEED, "tensors": [spec]}, target)[name]


def values(variable):
    return np.asarray(variable.value)


def convnet():
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, name="conv", kernel_initializer="he_normal"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(
                5,
                name="fc",
                bias_initializer=keras.initializers.RandomUniform(-0.5, 0.25),
            ),
        ],
        name="net",
    )


def test_weights_get_the_distributions_of_their_layers_initializers(target):
    model = convnet()
    returned = wk.init_model(model, SEED, target)

    expected = {
        "net/conv/kernel": ((3, 3, 3, 4), {"heNormal": {}}),
        "net/conv/bias": ((4,), {"zeros": {}}),
        "net/bn/gamma": ((4,), {"ones": {}}),
        "net/bn/beta": ((4,), {"zeros": {}}),
        "net/bn/moving_mean": ((4,), {"zeros": {}}),
        "net/bn/moving_variance": ((4,), {"ones": {}}),
        "net/fc/kernel": ((64, 5), {"glorotUniform": {}}),
        "net/fc/bias": ((5,), {"uniform": {"low": -0.5, "high": 0.25}}),
    }
    assert list(returned) == list(expected)
    for path, (shape, init) in expected.items():
        assert returned[path].path == path
        np.testing.assert_array_equal(values(returned[path]), fetch_one(target, path, shape, init))
    assert model.predict(np.ones((2, 6, 6, 3)), verbose=0).shape == (2, 5)


class _Custom(keras.initializers.Initializer):
    def __call__(self, shape, dtype=None):
        return keras.ops.zeros(shape, dtype)


def test_rules_names_and_unsupported_initializers(target):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, kernel_initializer=_Custom(), name="fc")],
        name="m",
    )
    with pytest.raises(ValueError, match=r"no initializer for m/fc/kernel \(Dense\): add rules"):
        wk.init_model(model, SEED, NOWHERE)
    with pytest.raises(ValueError, match=r"names: no parameter has the paths \['fc/kernel'\]"):
        wk.init_model(model, SEED, NOWHERE, rules=[("*", {"ones": {}})], names={"fc/kernel": "x"})

    rules = [("*/kernel", {"varianceScaling": {"scale": 2.0, "mode": "FAN_MODE_FAN_OUT"}})]
    wk.init_model(model, SEED, target, rules=rules, names={"m/fc/kernel": "fc.weight"})
    expected = fetch_one(target, "fc.weight", (4, 3), rules[0][1])
    np.testing.assert_array_equal(values(model.get_layer("fc").kernel), expected)


def test_orthogonal_and_identity_map_to_the_structured_schemes(target):
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(8, 3, kernel_initializer=keras.initializers.Orthogonal(2.0)),
            keras.layers.Flatten(),
            keras.layers.Dense(72, kernel_initializer=keras.initializers.Identity(0.5)),
        ],
        name="s",
    )
    returned = wk.init_model(model, SEED, target)
    conv, dense = (values(returned[path]) for path in ("s/conv2d/kernel", "s/dense/kernel"))
    # Keras's rule: [prod(shape[:-1]), shape[-1]] = [18, 8], orthonormal columns times gain.
    flat = conv.reshape(18, 8).astype(np.float64)
    np.testing.assert_allclose(flat.T @ flat, 4.0 * np.eye(8), atol=1e-5)
    expected = fetch_one(target, "s/conv2d/kernel", (3, 3, 2, 8), {"orthogonal": {"gain": 2.0}})
    np.testing.assert_array_equal(conv, expected)
    np.testing.assert_array_equal(dense, 0.5 * np.eye(72, 72))


def test_an_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="model: build it first"):
        wk.init_model(model, SEED, NOWHERE)


def test_initializer_builds_layers_and_serializes(target, tmp_path):
    kernel = wk.Initializer({"lecunUniform": {}}, seed=SEED, target=target, name="head.kernel")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, kernel_initializer=kernel, name="head")]
    )
    expected = fetch_one(target, "head.kernel", (8, 4), {"lecunUniform": {}})
    np.testing.assert_array_equal(values(model.get_layer("head").kernel), expected)

    # init_model keeps the initializer's own name and scheme for that weight.
    wk.init_model(model, SEED, target, rules=[("*/bias", {"ones": {}})])
    np.testing.assert_array_equal(values(model.get_layer("head").kernel), expected)

    config = keras.initializers.serialize(kernel)
    assert config["registered_name"] == "weightinit>Initializer"
    again = keras.initializers.deserialize(config)
    assert isinstance(again, wk.Initializer) and again.get_config() == kernel.get_config()

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.get_layer("head").kernel_initializer.get_config() == kernel.get_config()
    np.testing.assert_array_equal(values(loaded.get_layer("head").kernel), expected)


def test_a_saved_model_loads_and_predicts_with_no_server_running(tmp_path):
    """The config keeps no address and the file has the weights: loading needs no server."""
    token = tmp_path / "token"
    token.write_text("a-token-for-this-test-only\n")
    security = weightinit.Security(token_file=token)
    with serve(tmp_path / "stderr.log", "--auth-token-file", token) as address:
        kernel = wk.Initializer(
            {"heNormal": {}}, seed=SEED, target=address, name="k", security=security
        )
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(4, kernel_initializer=kernel)]
        )
        expected = fetch_token(address, security)
        np.testing.assert_array_equal(values(model.layers[0].kernel), expected)
        model.save(tmp_path / "model.keras")
    assert "127.0.0.1" not in json.dumps(kernel.get_config())

    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(values(loaded.layers[0].kernel), expected)
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Asked for values outside a load, a restored initializer says what it lacks.
    restored = loaded.layers[0].kernel_initializer
    with pytest.raises(ValueError, match="Initializer 'k': target: a restored Initializer"):
        restored((8, 4))


def fetch_token(address, security):
    spec = {"name": "k", "shape": [8, 4], "init": {"heNormal": {}}, "layout": "LAYOUT_KERAS"}
    return weightinit.fetch({"seed": SEED, "tensors": [spec]}, address, security=security)["k"]


def test_without_keras_backend_the_import_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json choosing a backend either
    done = subprocess.run(
        [sys.executable, "-c", "import weightinit.keras"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    if "tensorflow" not in done.stderr and done.returncode == 0:
        pytest.skip("TensorFlow is installed: Keras's default backend works")
    assert "set KERAS_BACKEND=jax (or torch)" in done.stderr, done.stderr


def test_sharded_variables_stay_sharded(target):
    """Under a keras.distribution.ModelParallel, each variable is fetched for its own sharding."""
    mesh = keras.distribution.DeviceMesh((4, 2), ["batch", "model"], jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d/fc/kernel"] = (None, "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc")], name="d")
    wk.init_model(model, SEED, target)

    kernel = model.get_layer("fc").kernel.value
    assert kernel.sharding.spec == P(None, "model")
    expected = fetch_one(target, "d/fc/kernel", (6, 8), {"glorotUniform": {}})
    np.testing.assert_array_equal(np.asarray(kernel), expected)


TORCH_BACKEND_SCRIPT = """
import json, sys
import keras
import weightinit.keras as wk

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc", dtype="bfloat16")],
                         name="m")
wk.init_model(model, int(sys.argv[2]), sys.argv[1])
kernel = keras.ops.convert_to_numpy(model.get_layer("fc").kernel.value)
print(json.dumps({"backend": keras.backend.backend(), "dtype": str(kernel.dtype),
                  "kernel": kernel.astype("float32").tolist()}))
"""


def test_other_backends_get_whole_tensors(target):
    """Keras on the torch backend (its own process: the backend is chosen at import)."""
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, "-c", TORCH_BACKEND_SCRIPT, target, str(SEED)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["backend"] == "torch" and result["dtype"] == "bfloat16"
    # bfloat16 is the rounding of the float32 tensor, which is exactly representable in float32.
    expected = fetch_one(target, "m/fc/kernel", (4, 3), {"glorotUniform": {}})
    rounded = expected.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.array(result["kernel"], np.float32), rounded)
