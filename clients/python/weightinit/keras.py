"""Initialize Keras 3 models from a weightinit server.

    import weightinit.keras
    weightinit.keras.init_model(model, seed=42, target="127.0.0.1:50051")

Every weight of the built model becomes one tensor of the request, named by its path
(`sequential/dense/kernel`), so the same model and seed give the same values in every process.
Without rules a weight gets the distribution of the initializer its layer was configured with
(`kernel_initializer`, `bias_initializer`, `gamma_initializer`, ...): GlorotUniform,
GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal, VarianceScaling, RandomNormal,
RandomUniform, TruncatedNormal, Zeros, Ones, Constant, Orthogonal, Identity and
weightinit.keras.Initializer. Any other (a custom one) needs a rule.

On the JAX backend each weight is fetched for the sharding its variable has (only the blocks of
this process's devices, each distinct block once); on the others it is fetched whole.
"""

import math
from collections.abc import Mapping
from typing import Any

try:
    import keras
except ModuleNotFoundError as error:
    if error.name != "tensorflow":
        raise
    # Keras's default backend is TensorFlow; say which setting picks another.
    raise ImportError(
        "keras: its backend is TensorFlow, which is not installed; set KERAS_BACKEND=jax (or "
        "torch) in the environment before importing keras or weightinit.keras"
    ) from error
from keras.src.backend.common import global_state

from . import _blocks, _rules
from .request import check_seed
from .security import Security

# Initializers without parameters, by their class; VarianceScaling subclasses come first.
_NAMED = {
    keras.initializers.GlorotUniform: "glorotUniform",
    keras.initializers.GlorotNormal: "glorotNormal",
    keras.initializers.HeUniform: "heUniform",
    keras.initializers.HeNormal: "heNormal",
    keras.initializers.LecunUniform: "lecunUniform",
    keras.initializers.LecunNormal: "lecunNormal",
    keras.initializers.Zeros: "zeros",
    keras.initializers.Ones: "ones",
}
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_NORMS = (
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.GroupNormalization,
)
# PyTorch's defaults of norm layers, by Keras weight name (running_var starts at 1 in torch).
_NORM_DEFAULTS = {
    "gamma": {"ones": {}},
    "beta": {"zeros": {}},
    "moving_mean": {"zeros": {}},
    "moving_variance": {"ones": {}},
}


def init_model(
    model: keras.Model,
    seed: int,
    target: str,
    *,
    rules: _rules.Rules | None = None,
    like: str | None = None,
    names: _rules.Names | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> dict[str, keras.Variable]:
    """Assigns every weight of the built Keras model `model` in place; returns {path: variable}.

    seed: the experiment's seed (u64). target: the server, "host:port".
    rules: a list of (pattern, value); the first pattern that matches a weight's path decides it.
        A str pattern is a glob on the whole path ("*/bias"), a compiled re.Pattern is searched
        in it. A value whose keys are scheme names is the init ({"heNormal": {}}); any other
        dict overrides TensorSpec fields ({"init": ..., "fanIn": "64"}).
    like: "torch" for PyTorch's defaults instead of the layers' initializers: the kernel
        [*k, in, out] of Dense and Conv1D/2D/3D is the torch weight [out, in, *k] (torchDefault,
        permuted into place), their bias torchDefaultBias with fanIn = in * prod(k), Embedding
        normal(0, 1), LayerNormalization, BatchNormalization and GroupNormalization ones and
        zeros. With `names` mapping paths to the torch model's parameter names, the values equal
        those weightinit.torch.init_module gives that model with the same seed. Weights of other
        layers need rules.
    names: {path: tensor name} or a callable path -> name; paths it leaves out keep their own.
        Without like, a weight whose layer was given a weightinit.keras.Initializer keeps that
        initializer's name (and its init unless a rule matches): the values it was built with.
    timeout: seconds per Generate call. security: a weightinit.Security, None for plaintext.

    Raises ValueError, before anything is fetched, for an unbuilt model, a weight without an
    init or bad arguments.
    """
    check_seed(seed)
    _rules.check_like(like)
    rules = _rules.check_rules(rules)
    if not model.built:
        raise ValueError("model: build it first (call it on data, or model.build(input_shape))")
    weights = model.weights
    paths = [weight.path for weight in weights]
    _rules.check_names(names, paths)
    # Keras has no public map from a weight to the layer that created it; _flatten_layers lists
    # parents before their sublayers, so the last layer holding a weight is its owner.
    owners = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for weight in layer.weights:
            owners[id(weight)] = layer

    specs, missing = [], []
    for path, weight in zip(paths, weights):
        layer = owners[id(weight)]
        spec = {
            "name": _rules.request_name(path, names),
            "shape": list(weight.shape),
            "dtype": _rules.dtype_name(weight.dtype, path),
            "layout": "LAYOUT_KERAS",
        }
        if like == "torch":
            spec.update(_torch_default(layer, weight))
        else:
            spec.update(_layer_default(layer, weight))
        spec.update(_rules.rule_for(path, rules))
        if "init" not in spec:
            missing.append(f"{path} ({type(layer).__name__})")
        specs.append(spec)
    if missing:
        raise _rules.missing_init_error(missing, '("*/kernel", {"heNormal": {}})')

    if keras.backend.backend() == "jax":
        from .jax import make_arrays

        tensors = list(zip(specs, (weight.value.sharding for weight in weights)))
        values = make_arrays(seed, tensors, target, timeout=timeout, security=security)
    else:
        wholes = [tuple((0, n) for n in _rules.view_shape(spec)) for spec in specs]
        fetched = _blocks.fetch_blocks(
            seed,
            [(spec, [whole]) for spec, whole in zip(specs, wholes)],
            target,
            timeout=timeout,
            security=security,
        )
        values = [blocks[whole] for blocks, whole in zip(fetched, wholes)]
    for weight, value in zip(weights, values):
        weight.assign(value)
    return dict(zip(paths, weights))


@keras.saving.register_keras_serializable(package="weightinit")
class Initializer(keras.initializers.Initializer):
    """A Keras initializer that fetches the tensor `name` from a weightinit server.

    init: the scheme ({"glorotUniform": {}}) or TensorSpec fields ({"init":
        {"torchDefaultBias": {}}, "fanIn": "784"}); fans come from [*kernel, in, out] shapes.
    seed: the experiment's seed (u64). target: the server, "host:port".
    name: the tensor's name, which with the seed keys its values. It must be unique per weight:
        an initializer does not know the path of the weight it initializes, so two layers
        sharing one would get the same values. init_model() names every weight by its path.
    timeout: seconds for the Generate call. security: a weightinit.Security, None for plaintext.

    Serializable (get_config / from_config, registered as "weightinit>Initializer") without its
    target and security, which belong to the machine: keras.models.load_model builds a saved
    model without contacting any server (the weights come from the file), and a restored
    Initializer asked for values anywhere else raises ValueError until given a target.
    """

    def __init__(
        self,
        init: Mapping[str, Any],
        *,
        seed: int,
        target: str | None,
        name: str,
        timeout: float | None = None,
        security: Security | None = None,
    ):
        check_seed(seed)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty str, got {name!r}")
        if target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target: must be a non-empty str (host:port), got {target!r}")
        self.spec = _rules.as_spec(init, "init")
        self.init = init
        self.seed = seed
        self.target = target
        self.name = name
        self.timeout = timeout
        self.security = security

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """Fetches the whole tensor of this `shape`, in `dtype` (default: keras floatx)."""
        dtype = keras.backend.standardize_dtype(dtype)
        spec = {
            "name": self.name,
            "shape": [int(n) for n in shape],
            "dtype": _rules.dtype_name(dtype, self.name),
            "layout": "LAYOUT_KERAS",
            **self.spec,
        }
        if self.target is None:
            if _loading():
                # keras.models.load_model replaces these values with the file's.
                return keras.ops.zeros(_rules.view_shape(spec), dtype=dtype)
            raise ValueError(
                f"Initializer {self.name!r}: target: a restored Initializer has no server "
                "address (saved configs keep none); set one, e.g. initializer.target = "
                '"host:port"'
            )
        whole = tuple((0, n) for n in _rules.view_shape(spec))
        fetched = _blocks.fetch_blocks(
            self.seed,
            [(spec, [whole])],
            self.target,
            timeout=self.timeout,
            security=self.security,
        )
        return keras.ops.convert_to_tensor(fetched[0][whole], dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        return {"init": self.init, "seed": self.seed, "name": self.name, "timeout": self.timeout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Initializer":
        # Files saved before targets left the config carry one: an address of another machine.
        return cls(**{**config, "target": None})


def _loading():
    """Whether keras.models.load_model is building a saved model: it deserializes inside its
    object-sharing scope, which only loading opens (Keras has no public flag for it)."""
    return global_state.get_global_attribute("shared_objects/id_to_obj_map") is not None


def _torch_default(layer, weight):
    """PyTorch's default init of `weight` of `layer`, as TensorSpec fields ({} if none)."""
    if isinstance(layer, (keras.layers.Dense, *_CONVS)):
        if weight.name == "kernel":
            return _rules.torch_kernel(tuple(weight.shape))
        if weight.name == "bias":
            return _rules.torch_bias(tuple(layer.kernel.shape))
    if isinstance(layer, keras.layers.Embedding) and weight.name == "embeddings":
        return {"init": {"normal": {}}}
    if isinstance(layer, _NORMS) and weight.name in _NORM_DEFAULTS:
        return {"init": _NORM_DEFAULTS[weight.name]}
    return {}


def _layer_default(layer, weight):
    """The init of the initializer `layer` was configured with for `weight` ({} if unknown)."""
    initializer = getattr(layer, f"{weight.name}_initializer", None)
    if isinstance(initializer, Initializer):
        return {"name": initializer.name, **initializer.spec}
    for kind, scheme in _NAMED.items():
        if type(initializer) is kind:
            return {"init": {scheme: {}}}
    if type(initializer) is keras.initializers.Constant:
        return {"init": {"constant": {"value": float(initializer.value)}}}
    if type(initializer) is keras.initializers.RandomNormal:
        return {"init": {"normal": {"mean": initializer.mean, "std": initializer.stddev}}}
    if type(initializer) is keras.initializers.RandomUniform:
        return {"init": {"uniform": {"low": initializer.minval, "high": initializer.maxval}}}
    if type(initializer) is keras.initializers.TruncatedNormal:
        # Keras redraws values more than two standard deviations from the mean.
        mean, std = initializer.mean, initializer.stddev
        bounds = {"a": mean - 2 * std, "b": mean + 2 * std}
        return {"init": {"truncatedNormal": {"mean": mean, "std": std, **bounds}}}
    if type(initializer) is keras.initializers.VarianceScaling:
        return _variance_scaling(initializer, tuple(weight.shape))
    # Both take the kernel's own layout: Orthogonal flattens to [prod(shape[:-1]), shape[-1]].
    if type(initializer) is keras.initializers.Orthogonal:
        return {"init": {"orthogonal": {"gain": float(initializer.gain)}}}
    if type(initializer) is keras.initializers.Identity:
        return {"init": {"identity": {"gain": float(initializer.gain)}}}
    return {}


def _variance_scaling(initializer, shape):
    """A Keras VarianceScaling as TensorSpec fields, with its explicit fan axes if it has any."""
    scheme = {
        "scale": initializer.scale,
        "mode": _rules.FAN_MODES[initializer.mode],
        "distribution": _rules.DISTRIBUTIONS[initializer.distribution],
    }
    spec = {"init": {"varianceScaling": scheme}}
    # Newer Keras versions take explicit fan axes; with both set they replace the computed fans.
    axes = getattr(initializer, "input_axes", None), getattr(initializer, "output_axes", None)
    if None not in axes:
        for key, fan_axes in zip(("fanIn", "fanOut"), axes):
            spec[key] = str(math.prod(shape[axis] for axis in fan_axes))
    return spec
