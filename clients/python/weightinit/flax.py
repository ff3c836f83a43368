"""Flax parameters (Linen and NNX) from a weightinit server.

    import weightinit.flax
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = weightinit.flax.init_params(abstract, seed=42, target="127.0.0.1:50051")

Every leaf becomes one tensor of the request, named by its path in the tree ("Dense_0/kernel",
"layers/0/kernel"), so the same model and seed give the same values in every process; a leaf
that carries a sharding is fetched block by block as weightinit.jax.make_array does.

Without rules, leaves get Flax's defaults by their name: "kernel" lecunNormal ([*kernel, in, out]
fans, as nn.Dense and nn.Conv), "bias" zeros, "scale" ones, "embedding" normal with
std 1/sqrt(features) (nn.Embed). Any other leaf needs a rule.

`initializer()` is the other route: a standard (key, shape, dtype) initializer for one parameter,
usable inside jax.jit(model.init). It never learns which parameter it initializes, so it takes
that parameter's name; init_params() names every leaf by its path instead.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from . import _blocks, _rules
from .jax import _dtype_name, make_arrays
from .request import check_seed
from .security import Security


def init_params(
    abstract_params: Any,
    seed: int,
    target: str,
    *,
    rules: _rules.Rules | None = None,
    like: str | None = None,
    names: _rules.Names | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> Any:
    """Returns `abstract_params` with every leaf replaced by its initial value.

    abstract_params: a pytree whose leaves have shape and dtype: what
        jax.eval_shape(model.init, ...)["params"] gives for Linen (boxed nn.Partitioned leaves
        stay boxed), or nnx.state(nnx.eval_shape(...), nnx.Param) for NNX (merge the result
        with nnx.update or nnx.merge). A leaf with a `sharding` (a ShapeDtypeStruct built with
        one, a jax.Array) becomes an array with that sharding; any other is placed on the first
        local device.
    seed: the experiment's seed (u64). target: the server, "host:port".
    rules: a list of (pattern, value); the first pattern that matches a leaf's path decides it.
        A str pattern is a glob on the whole path ("*/bias"), a compiled re.Pattern is searched
        in it. A value whose keys are scheme names is the init ({"heNormal": {}}); any other
        dict overrides TensorSpec fields ({"init": ..., "fanIn": "64"}).
    like: "torch" for PyTorch's defaults: a kernel [*k, in, out] is the torch weight
        [out, in, *k] (torchDefault, permuted into place), a bias next to a kernel
        torchDefaultBias with fanIn = in * prod(k), "embedding" normal(0, 1), "scale" ones, any
        other "bias" zeros. With `names` mapping paths to the torch model's parameter names, the
        values equal those weightinit.torch.init_module gives that model with the same seed.
    names: {path: tensor name} or a callable path -> name; paths it leaves out keep their own.
    timeout: seconds per Generate call. security: a weightinit.Security, None for plaintext.

    Raises ValueError, before anything is fetched, for a leaf without an init or bad arguments.
    """
    check_seed(seed)
    _rules.check_like(like)
    entries, treedef = jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=_is_box)
    paths = [_path_name(path) for path, _ in entries]
    _rules.check_names(names, paths)
    values = [_unboxed(leaf) for _, leaf in entries]
    for path, value in zip(paths, values):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise ValueError(f"abstract_params: {path} has no shape and dtype: {value!r}")
    shapes = {path: tuple(value.shape) for path, value in zip(paths, values)}

    tensors, missing = [], []
    for path, value in zip(paths, values):
        spec = {
            "name": _rules.request_name(path, names),
            "shape": list(value.shape),
            "dtype": _dtype_name(value.dtype, path),
            "layout": "LAYOUT_KERAS",
        }
        spec.update(_default_spec(path, value.shape, shapes, like))
        spec.update(_rules.rule_for(path, rules or ()))
        if "init" not in spec:
            missing.append(path)
        tensors.append((spec, _sharding(value)))
    if missing:
        raise _rules.missing_init_error(missing, '("*/kernel", {"heNormal": {}})')

    arrays = make_arrays(seed, tensors, target, timeout=timeout, security=security)
    leaves = [_reboxed(leaf, array) for (_, leaf), array in zip(entries, arrays)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def initializer(
    init: Mapping[str, Any],
    *,
    seed: int,
    target: str,
    name: str,
    timeout: float | None = None,
    security: Security | None = None,
) -> Callable[..., jax.Array]:
    """A Flax initializer `(key, shape, dtype) -> array` of the tensor `name`, for one parameter.

    init: the scheme ({"lecunNormal": {}}) or TensorSpec fields ({"init":
        {"torchDefaultBias": {}}, "fanIn": "784"}); fans come from [*kernel, in, out] shapes.
    name: the tensor's name, which with the seed keys its values. It must be unique per
        parameter: an initializer does not know the path of the parameter it initializes, so two
        layers sharing one initializer would get the same values. init_params() names every
        parameter by its path and needs no name.

    The key is ignored. The values are fetched through jax.pure_callback, so the initializer
    works inside jax.jit(model.init) and jax.eval_shape (which fetches nothing).
    """
    check_seed(seed)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty str, got {name!r}")
    overrides = _rules.as_spec(init, "init")

    def init_fn(key, shape, dtype=jnp.float32):
        spec = {
            "name": name,
            "shape": [int(n) for n in shape],
            "dtype": _dtype_name(dtype, name),
            "layout": "LAYOUT_KERAS",
            **overrides,
        }
        view = _rules.view_shape(spec)
        whole = tuple((0, n) for n in view)

        def fetch_whole():
            fetched = _blocks.fetch_blocks(
                seed, [(spec, [whole])], target, timeout=timeout, security=security
            )
            return fetched[0][whole]

        result = jax.ShapeDtypeStruct(view, _rules.numpy_dtype(spec["dtype"]))
        return jax.pure_callback(fetch_whole, result)

    return init_fn


def _is_box(node):
    return isinstance(node, (nnx.Variable, meta.AxisMetadata))


def _unboxed(leaf):
    """The array-like inside an NNX Variable or a Linen metadata box (the leaf itself if none)."""
    if not _is_box(leaf):
        return leaf
    (value,) = jax.tree_util.tree_leaves(leaf)
    return value


def _reboxed(leaf, array):
    """`array` in `leaf`'s box, keeping the box's metadata."""
    return jax.tree_util.tree_map(lambda _: array, leaf) if _is_box(leaf) else array


def _path_name(path):
    """A key path as "Dense_0/kernel", "layers/0/kernel"."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key.key))
    return "/".join(parts)


def _sharding(value):
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _default_spec(path, shape, shapes, like):
    """The default TensorSpec fields of the leaf at `path`, {} when there is none."""
    parent, _, leaf = path.rpartition("/")
    kernel = shapes.get(f"{parent}/kernel" if parent else "kernel")
    if leaf == "kernel" and len(shape) >= 2:
        if like == "torch":
            return _rules.torch_kernel(shape)
        return {"init": {"lecunNormal": {}}}
    if leaf == "bias" and like == "torch" and kernel is not None and len(kernel) >= 2:
        return _rules.torch_bias(kernel)
    if leaf == "bias":
        return {"init": {"zeros": {}}}
    if leaf == "scale":
        return {"init": {"ones": {}}}
    if leaf == "embedding" and len(shape) == 2:
        if like == "torch":
            return {"init": {"normal": {}}}
        # nn.Embed's variance_scaling(1, "fan_in", "normal", out_axis=0): fan_in = features.
        return {
            "init": {"varianceScaling": {"distribution": "DISTRIBUTION_UNTRUNCATED_NORMAL"}},
            "fanIn": str(shape[1]),
        }
    return {}
