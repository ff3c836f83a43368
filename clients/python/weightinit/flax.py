"""Flax parameters (Linen and NNX) from a weightinit server, with the model's own initializers.

    import weightinit.flax
    with jax.set_mesh(mesh):                                # optional: Flax's sharding route
        model = weightinit.flax.init_params(lambda: Model(rngs=nnx.Rngs(0)), 42, target)
    variables = weightinit.flax.init_params(              # Linen: what model.init returns
        functools.partial(linen_model.init, jax.random.key(0), x), 42, target)

Given the function that builds the model, init_params builds it abstractly (nnx.eval_shape) and
reads the initializer each parameter was declared with (jax.nn.initializers / flax's: variance
scaling with its mode, distribution and axes, glorot/he/lecun, normal, truncated_normal, uniform,
zeros, ones, constant, orthogonal), with the shape it was called with: Flax's DenseGeneral and
LinearGeneral (attention) call it on the flattened [in, out] kernel, whose fans are then sent
explicitly. Every parameter becomes one tensor named by its path ("Dense_0/kernel",
"layers/0/kernel"), so the same model and seed give the same values in every process; a leaf
with a sharding (set_mesh, nnx.get_abstract_model, Linen partitioning boxes) is fetched block by
block as weightinit.jax.make_array does.

`initializer()` is the other route: a standard (key, shape, dtype) initializer for one parameter,
usable inside jax.jit(model.init), where each device fetches only its own block.
"""

import functools
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from flax.core import meta
from flax.linen import spmd as linen_spmd

from . import _blocks, _rules
from .jax import _dtype_name, concrete_sharding, make_arrays
from .request import check_seed
from .security import Security

_INITS = jax.nn.initializers


def _fans(shape, in_axis, out_axis, batch_axis):
    """jax.nn.initializers' fans of a call shape (its _compute_fans), as ints."""

    def size(axes):
        return shape[axes] if isinstance(axes, int) else int(np.prod([shape[i] for i in axes]))

    field = Fraction(int(np.prod(shape)), size(in_axis) * size(out_axis) * size(batch_axis))
    fans = size(in_axis) * field, size(out_axis) * field
    if any(fan.denominator != 1 for fan in fans):
        raise ValueError(f"its fans {tuple(map(float, fans))} are not whole numbers")
    return [str(int(fan)) for fan in fans]


def _variance_scaling(cells, shape):
    fan_in, fan_out = _fans(shape, cells["in_axis"], cells["out_axis"], cells["batch_axis"])
    scheme = {
        "scale": float(cells["scale"]),
        "mode": _rules.FAN_MODES[cells["mode"]],
        "distribution": _rules.DISTRIBUTIONS[cells["distribution"]],
    }
    return {"init": {"varianceScaling": scheme}, "fanIn": fan_in, "fanOut": fan_out}


def _truncated_normal(cells, shape):
    # std * truncated_normal(lower, upper): the bounds in units of std, as weightinit's a, b are
    # absolute.
    std = float(cells["stddev"])
    bounds = {"a": float(cells["lower"]) * std, "b": float(cells["upper"]) * std}
    return {"init": {"truncatedNormal": {"std": std, **bounds}}}


def _constant(cells, shape):
    value = np.asarray(cells["value"])
    if value.ndim != 0 or not np.isrealobj(value):
        raise ValueError(f"its value {cells['value']!r} is not one real number")
    return {"init": {"constant": {"value": float(value)}}}


def _orthogonal(cells, shape):
    # weightinit's orthogonal under LAYOUT_KERAS is jax's with column_axis the last one.
    if cells["column_axis"] not in (-1, len(shape) - 1):
        raise ValueError(f"its column_axis is {cells['column_axis']}, weightinit's the last one")
    return {"init": {"orthogonal": {"gain": float(cells["scale"])}}}


# jax.nn.initializers (which flax.linen.initializers and flax.nnx.initializers re-export), by the
# code of the function they return: cells (the closure's values) and call shape -> TensorSpec
# fields; glorot/he/lecun/kaiming/xavier are variance_scaling closures.
_READERS = {
    _INITS.variance_scaling(1.0, "fan_in", "normal").__code__: _variance_scaling,
    _INITS.normal().__code__: lambda c, s: {"init": {"normal": {"std": float(c["stddev"])}}},
    _INITS.truncated_normal().__code__: _truncated_normal,
    _INITS.uniform().__code__: lambda c, s: {"init": {"uniform": {"high": float(c["scale"])}}},
    _INITS.constant(0.0).__code__: _constant,
    _INITS.orthogonal().__code__: _orthogonal,
    _INITS.zeros.__code__: lambda cells, shape: {"init": {"zeros": {}}},
    _INITS.ones.__code__: lambda cells, shape: {"init": {"ones": {}}},
}
# Non-elementwise schemes, whose values depend on the shape they are generated as.
_SHAPED = {_INITS.orthogonal().__code__}


def _nested_code(function, name):
    code = inspect.unwrap(function).__code__
    return next(c for c in code.co_consts if getattr(c, "co_name", None) == name)


# Flax's wrappers that call the declared initializer on a flattened shape and only reshape (and
# box) its result: DenseGeneral's (Linen) and LinearGeneral's (NNX, attention's projections).
_RESHAPERS = {
    _nested_code(function, name)
    for function in (linen.DenseGeneral.__call__, nnx.LinearGeneral.__init__)
    for name in ("kernel_init_wrap", "bias_init_wrap")
}


def _unreadable(path, why):
    return ValueError(
        f"{path}: its initializer cannot be served ({why}); replace it with a rule, e.g. "
        f'rules=[("{path}", {{"normal": {{"std": 0.02}}}})]'
    )


class _Declared:
    """One initializer call: the reader of its function, its closure's values, the call shape."""

    def __init__(self, code, cells, shape):
        self.code, self.cells, self.shape = code, cells, shape

    def spec(self, leaf_shape):
        """The TensorSpec fields serving this call's distribution for a leaf of `leaf_shape`;
        ValueError saying why when weightinit cannot serve it."""
        try:
            shape = tuple(int(n) for n in self.shape)
            if self.code in _SHAPED and shape != tuple(leaf_shape):
                raise ValueError(f"it is called on the shape {shape}, then reshaped")
            return _READERS[self.code](self.cells, shape)
        except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as error:
            raise ValueError(str(error)) from None


def _declared_of(function, shape):
    """The _Declared of calling the jax initializer `function` (one _READERS reads) on `shape`."""
    cells = [cell.cell_contents for cell in function.__closure__ or ()]
    return _Declared(function.__code__, dict(zip(function.__code__.co_freevars, cells)), shape)


class _Recorder:
    """Records, while a model is built (sys.setprofile, this thread only), each call of a known
    initializer and the value it made, followed through _RESHAPERS and into the nnx.Variable
    that holds it. A value any other code changed is unknown: its leaf is refused."""

    _VARIABLE_INIT = nnx.Variable.__init__.__code__

    def __init__(self):
        self.made = {}  # id(value) -> (value, _Declared); the value is kept alive for its id
        self.variables = {}  # id(nnx.Variable) -> (variable, _Declared)
        self.frames = []  # [frame, _Declared or None, [_Declared made inside]]

    def __enter__(self):
        self.previous = sys.getprofile()
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self.previous)

    def declared(self, value):
        found = self.made.get(id(_raw(value)))
        return None if found is None else found[1]

    def _event(self, frame, event, arg):
        code = frame.f_code
        if event == "call":
            if code in _READERS:
                names = code.co_freevars
                cells = {name: frame.f_locals[name] for name in names}
                self.frames.append([frame, _Declared(code, cells, frame.f_locals["shape"]), []])
            elif code in _RESHAPERS:
                self.frames.append([frame, None, []])
            elif code is self._VARIABLE_INIT:
                found = self.declared(frame.f_locals.get("value"))
                if found is not None:
                    variable = frame.f_locals["self"]
                    self.variables[id(variable)] = (variable, found)
        elif event == "return" and self.frames and self.frames[-1][0] is frame:
            _, declared, inner = self.frames.pop()
            if declared is None and len(inner) == 1:
                declared = inner[0]
            if declared is not None and arg is not None:
                self.made[id(_raw(arg))] = (arg, declared)
                if self.frames:
                    self.frames[-1][2].append(declared)


def _trace(init_fn, mesh):
    """Builds `init_fn`'s model abstractly; returns (the abstract result, {path: _Declared}),
    paths as _served names them."""
    found = {}

    def traced():
        with _Recorder() as recorder:
            out = init_fn()
        if isinstance(out, nnx.Module):
            for path, node in nnx.iter_graph(out):
                if isinstance(node, nnx.Variable) and id(node) in recorder.variables:
                    found["/".join(map(str, path))] = recorder.variables[id(node)][1]
        else:
            served = out["params"] if _is_linen_variables(out) else out
            for path, leaf in jax.tree_util.tree_flatten_with_path(served, is_leaf=_is_box)[0]:
                declared = recorder.declared(leaf)
                if declared is not None:
                    found[_path_name(path)] = declared
        return out

    with _mesh_context(mesh):
        return nnx.eval_shape(traced), found


def _is_linen_variables(tree):
    return isinstance(tree, Mapping) and "params" in tree


def _served(init_fn, abstract, mesh):
    """The part of `init_fn`'s abstract result weightinit serves (an NNX model's nnx.Param
    state, Linen's "params" collection, else all of it), and a function putting served values
    back with the rest: RNG state, batch statistics and other collections, which Flax's own
    init makes under jax.jit (where XLA drops the work of the unused parameters)."""
    if isinstance(abstract, nnx.Module):
        graphdef, served, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            with _mesh_context(mesh):
                rest = nnx.jit(lambda: nnx.split(init_fn(), nnx.Param, ...)[2])()
        return served, lambda values: nnx.merge(graphdef, values, rest)
    if _is_linen_variables(abstract):
        rest = {}
        if len(abstract) > 1:
            with _mesh_context(mesh):
                rest = jax.jit(lambda: {k: v for k, v in init_fn().items() if k != "params"})()
        return abstract["params"], lambda values: type(abstract)({**rest, "params": values})
    return abstract, lambda values: values


def _mesh_context(mesh):
    # jax.set_mesh sets the mesh when called, not when entered: call it only to enter it.
    return jax.set_mesh(mesh) if mesh is not None else nullcontext()


def init_params(
    params: Any,
    seed: int,
    target: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: _rules.Rules | None = None,
    like: str | None = None,
    names: _rules.Names | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> Any:
    """Returns the model or parameters `params` stands for, every parameter initialized.

    params: one of
        - the function that builds the model, what nnx.eval_shape or jax.eval_shape takes:
          `lambda: Model(rngs=nnx.Rngs(0))` (NNX: the initialized model is returned) or
          `functools.partial(model.init, key, x)` (Linen: its variables, boxes kept). Each
          parameter gets the distribution of the initializer it was declared with;
        - an abstract NNX model, an nnx.State, or a Linen params tree
          (jax.eval_shape(model.init, ...)["params"]): they do not say how their parameters
          were declared, so each needs a rule (or like="torch").
        A leaf with a sharding (a ShapeDtypeStruct built with one, NNX's out_sharding under
        jax.set_mesh, a Linen Partitioned or LogicallyPartitioned box) becomes an array with
        that sharding, each process fetching only its devices' blocks; any other becomes an
        uncommitted array on the default device, as Flax's own init gives.
    seed: the experiment's seed (u64). target: the server, "host:port".
    mesh: the mesh for shardings that name none (AbstractMesh shardings, Linen boxes without
        one); default: the one of `with jax.set_mesh(mesh)`.
    rules: a list of (pattern, value); the first pattern that matches a leaf's path decides it,
        over its initializer. A str pattern is a glob on the whole path ("*/bias"), a compiled
        re.Pattern is searched in it. A value whose keys are scheme names is the init
        ({"heNormal": {}}); any other dict sets TensorSpec fields ({"init": ..., "fanIn": "64"}).
    like: "torch" for PyTorch's defaults instead of the declared initializers: a kernel
        [*k, in, out] is the torch weight [out, in, *k] (torchDefault, permuted into place), a
        bias next to a kernel torchDefaultBias with fanIn = in * prod(k), "embedding"
        normal(0, 1), "scale" ones. With `names` mapping paths to the torch model's parameter
        names, the values equal those weightinit.torch.init_module gives that model. A kernel
        Flax reshapes (DenseGeneral's, attention's) has no torch default: it needs a rule.
    names: {path: tensor name} or a callable path -> name; paths it leaves out keep their own.
    timeout: seconds per Generate call. security: a weightinit.Security, None for plaintext.

    Raises ValueError, before anything is fetched, naming the parameter path: for an
    initializer that cannot be served, a leaf without an init, a sharding that does not fit.
    """
    check_seed(seed)
    _rules.check_like(like)
    rules = _rules.check_rules(rules)
    declared = {}
    traced = callable(params) and not isinstance(params, nnx.Module | linen.Module)
    rebuild = None
    if traced:
        abstract, declared = _trace(params, mesh)
        params, rebuild = _served(params, abstract, mesh)
    elif isinstance(params, nnx.Module):
        graphdef, params = nnx.split(params)
        rebuild = functools.partial(nnx.merge, graphdef)
    entries, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    paths = [_path_name(path) for path, _ in entries]
    _rules.check_names(names, paths)
    values = [_raw(leaf) for _, leaf in entries]
    for path, value in zip(paths, values):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise ValueError(f"params: {path} has no shape and dtype: {value!r}")
    shapes = {path: tuple(value.shape) for path, value in zip(paths, values)}

    tensors, missing = [], []
    for path, (_, leaf), value in zip(paths, entries, values):
        spec = {
            "name": _rules.request_name(path, names),
            "shape": list(value.shape),
            "dtype": _dtype_name(value.dtype, path),
            "layout": "LAYOUT_KERAS",
        }
        rule = _rules.rule_for(path, rules)
        if like == "torch":
            # A kernel Flax reshapes (DenseGeneral's) has no torch layer to follow: no default.
            if path not in declared or len(declared[path].shape) == len(value.shape):
                spec.update(_torch_default(path, value.shape, shapes))
        elif traced and "init" not in rule:
            if path not in declared:
                raise _unreadable(path, "not one of jax.nn.initializers, or its values changed")
            try:
                spec.update(declared[path].spec(value.shape))
            except ValueError as error:
                raise _unreadable(path, error) from None
        spec.update(rule)
        if "init" not in spec:
            missing.append(path)
        elif _rules.view_shape(spec) != tuple(value.shape):
            raise ValueError(
                f"{path}: its rule makes a {_rules.view_shape(spec)} tensor, the leaf is "
                f"{tuple(value.shape)}"
            )
        tensors.append((spec, _sharding(path, leaf, value, mesh)))
    if missing:
        example = f'("{missing[0]}", {{"heNormal": {{}}}})'
        hint = "" if traced else ", or pass the function that builds the model"
        raise _rules.missing_init_error(missing, example, hint)

    arrays = make_arrays(seed, tensors, target, timeout=timeout, security=security)
    leaves = [_reboxed(leaf, array) for (_, leaf), array in zip(entries, arrays)]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return params if rebuild is None else rebuild(params)


def initializer(
    init: Mapping[str, Any] | Callable[..., Any],
    *,
    seed: int,
    target: str,
    name: str,
    sharding: jax.sharding.Sharding | jax.sharding.PartitionSpec | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> Callable[..., jax.Array]:
    """A Flax initializer `(key, shape, dtype, out_sharding=None) -> array` of the tensor `name`.

    init: a scheme ({"lecunNormal": {}}), TensorSpec fields ({"init": {"torchDefaultBias": {}},
        "fanIn": "784"}; fans from [*kernel, in, out] shapes), or one of jax.nn.initializers
        (nn.initializers.lecun_normal(), ...): its distribution, with its fans, is served.
    name: the tensor's name, which with the seed keys its values. It must be unique per
        parameter: an initializer does not know the path of the parameter it initializes, so two
        layers sharing one initializer would get the same values.
    sharding: of the array it returns (a NamedSharding, or a PartitionSpec on the mesh of
        jax.set_mesh), unless the caller passes out_sharding. Under jax.jit each device then
        fetches only its own block; without one the whole array is fetched (one device holds it).

    The key is ignored. The values are fetched through jax.pure_callback, so the initializer
    works inside jax.jit(model.init) and jax.eval_shape (which fetches nothing). Raises
    ValueError for bad arguments, and when called for a shape the init or sharding does not fit.
    """
    check_seed(seed)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty str, got {name!r}")
    if callable(init):
        if getattr(init, "__code__", None) not in _READERS:
            raise ValueError(f"init: {init!r} is not one of jax.nn.initializers weightinit serves")
        overrides = None
    else:
        overrides = _rules.as_spec(init, "init")
    if sharding is not None and not isinstance(
        sharding, jax.sharding.Sharding | jax.sharding.PartitionSpec
    ):
        raise ValueError(f"sharding: must be a Sharding or a PartitionSpec, got {sharding!r}")

    def init_fn(key, shape, dtype=jnp.float32, out_sharding=None):
        shape = tuple(int(n) for n in shape)
        spec = {
            "name": name,
            "shape": list(shape),
            "dtype": _dtype_name(dtype, name),
            "layout": "LAYOUT_KERAS",
        }
        if overrides is None:
            try:
                spec.update(_declared_of(init, shape).spec(shape))
            except ValueError as error:
                raise ValueError(f"init: {error}, for the shape {shape} of {name!r}") from None
        else:
            spec.update(overrides)
        view = _rules.view_shape(spec)
        result = jax.ShapeDtypeStruct(view, _rules.numpy_dtype(spec["dtype"]))
        placed = out_sharding if out_sharding is not None else sharding
        if placed is None:
            whole = tuple((0, n) for n in view)
            return jax.pure_callback(lambda: _fetch(spec, whole), result)
        return _fetch_sharded(spec, result, placed)

    def _fetch(spec, block):
        fetched = _blocks.fetch_blocks(
            seed, [(spec, [block])], target, timeout=timeout, security=security
        )
        return fetched[0][block]

    def _fetch_sharded(spec, result, placed):
        """Under shard_map, each device's callback fetches its own block."""
        named = concrete_sharding(spec["name"], placed, result.shape, traced=True)
        if not isinstance(named, jax.sharding.NamedSharding):
            raise ValueError(  # noqa: TRY004
                f"{spec['name']}: sharding: give a NamedSharding or a PartitionSpec"
            )
        mesh, parts = named.mesh, _parts(spec["name"], named, result.shape)
        local = tuple(
            n // math.prod(mesh.shape[a] for a in axes) for n, axes in zip(result.shape, parts)
        )

        def fetch_local(*starts):
            return _fetch(spec, tuple((int(s), int(s) + n) for s, n in zip(starts, local)))

        def body():
            starts = []
            for size, axes in zip(local, parts):
                index = 0
                for axis in axes:
                    index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
                starts.append(index * size)
            return jax.pure_callback(fetch_local, result.update(shape=local), *starts)

        return jax.shard_map(body, mesh=mesh, in_specs=(), out_specs=named.spec)()

    return init_fn


def _parts(name, sharding, shape):
    """The mesh axes splitting each dimension; ValueError unless each splits it evenly."""
    parts = []
    for dim, (n, entry) in enumerate(zip(shape, (*sharding.spec, *[None] * len(shape)))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        count = math.prod(sharding.mesh.shape[a] for a in axes)
        if n % count:
            raise ValueError(
                f"{name}: dimension {dim} ({n}) does not split evenly over the mesh axes {axes}"
            )
        parts.append(axes)
    return parts


def _is_box(node):
    return isinstance(node, nnx.Variable | meta.AxisMetadata | nnx.VariableMetadata)


def _raw(leaf):
    """The array-like inside an NNX Variable or metadata, or a Linen box (itself if none)."""
    while True:
        if isinstance(leaf, nnx.VariableMetadata):
            leaf = leaf.raw_value
        elif isinstance(leaf, nnx.Variable | meta.AxisMetadata):
            (leaf,) = jax.tree_util.tree_leaves(leaf)
        else:
            return leaf


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


def _sharding(path, leaf, value, mesh):
    """The sharding the leaf at `path` asks for (None: none), on a concrete mesh."""
    sharding = getattr(value, "sharding", None)
    if isinstance(leaf, meta.Partitioned) and not isinstance(sharding, jax.sharding.Sharding):
        if isinstance(leaf, linen_spmd.LogicallyPartitioned):
            spec = linen.logical_to_mesh_axes(leaf.names, leaf.rules)
        else:
            spec = leaf.get_partition_spec()
        sharding = spec if leaf.mesh is None else jax.sharding.NamedSharding(leaf.mesh, spec)
    if sharding is None:
        return None
    return concrete_sharding(path, sharding, tuple(value.shape), mesh)


def _torch_default(path, shape, shapes):
    """PyTorch's default init of the leaf at `path` as TensorSpec fields, {} when there is none."""
    parent, _, leaf = path.rpartition("/")
    kernel = shapes.get(f"{parent}/kernel" if parent else "kernel")
    if leaf == "kernel" and len(shape) >= 2:
        return _rules.torch_kernel(shape)
    if leaf == "bias" and kernel is not None and len(kernel) >= 2:
        return _rules.torch_bias(kernel)
    if leaf == "bias":
        return {"init": {"zeros": {}}}
    if leaf == "scale":
        return {"init": {"ones": {}}}
    if leaf == "embedding" and len(shape) == 2:
        return {"init": {"normal": {}}}
    return {}
