"""Framework-neutral pieces of weightinit.jax, .flax and .keras (numpy only): rules, dtypes, and
the TensorSpec fields that give a [*kernel, in, out] kernel the values of a PyTorch layer."""

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format

from weightinit.v1 import weightinit_pb2 as pb

# Keys that make a rule's value an Init (a scheme) rather than TensorSpec overrides, and the
# proto3 JSON name of every TensorSpec field under either of its spellings.
INIT_KEYS = {key for f in pb.Init.DESCRIPTOR.fields for key in (f.name, f.json_name)}
SPEC_KEYS = {
    key: f.json_name for f in pb.TensorSpec.DESCRIPTOR.fields for key in (f.name, f.json_name)
}

# A rule: (glob or compiled regex on the path, scheme or TensorSpec fields), as in weightinit.torch.
Rules = Sequence[tuple[str | re.Pattern[str], Mapping[str, Any]]]
# Framework paths to tensor names: a mapping (paths left out keep their own) or a function.
Names = Mapping[str, str] | Callable[[str], str]

_DTYPE_NAMES = {
    "float32": "DTYPE_FLOAT32",
    "float64": "DTYPE_FLOAT64",
    "float16": "DTYPE_FLOAT16",
    "bfloat16": "DTYPE_BFLOAT16",
}
_LAYOUTS = {"torch": "LAYOUT_TORCH", "keras": "LAYOUT_KERAS"}
# Variance scaling's mode and distribution names, as JAX, Keras and timm spell them ("normal"
# is JAX's and timm's untruncated normal; Keras 3 says "untruncated_normal").
FAN_MODES = {
    "fan_in": "FAN_MODE_FAN_IN",
    "fan_out": "FAN_MODE_FAN_OUT",
    "fan_avg": "FAN_MODE_FAN_AVG",
    "fan_geo_avg": "FAN_MODE_FAN_GEO_AVG",
}
DISTRIBUTIONS = {
    "truncated_normal": "DISTRIBUTION_TRUNCATED_NORMAL",
    "normal": "DISTRIBUTION_UNTRUNCATED_NORMAL",
    "untruncated_normal": "DISTRIBUTION_UNTRUNCATED_NORMAL",
    "uniform": "DISTRIBUTION_UNIFORM",
}


def check_like(like):
    """Raises ValueError unless like is None or "torch"."""
    if like not in (None, "torch"):
        raise ValueError(f'like: must be None or "torch", got {like!r}')


def as_spec(value, what):
    """A rule's or an initializer's value as TensorSpec fields, checked against the proto: a
    value whose keys are all scheme names is the Init ({"heNormal": {}}); any other dict sets
    fields ({"init": ..., "fanIn": "64"}). ValueError naming `what` for anything else, or for a
    field that is misspelt or of the wrong type (proto3 JSON's own check, as a ValueError)."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{what}: must be a scheme or TensorSpec fields (a dict), got {value!r}")
    schemes = sorted(set(value) & INIT_KEYS)
    fields = sorted(set(value) - INIT_KEYS)
    if schemes and fields:
        raise ValueError(
            f"{what}: mixes scheme keys {schemes} with TensorSpec keys {fields}; give the scheme "
            f'alone, or put it under "init": {{"init": {{{schemes[0]!r}: ...}}, ...}}'
        )
    if schemes:
        value = {"init": dict(value)}
    unknown = sorted(set(value) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{what}: {unknown} are neither schemes nor TensorSpec fields")
    spec = {SPEC_KEYS[key]: field for key, field in value.items()}
    if "slice" in spec:
        raise ValueError(f"{what}: slice is computed from each array's sharding; drop it")
    try:
        json_format.ParseDict(spec, pb.TensorSpec())
    except json_format.ParseError as error:
        raise ValueError(f"{what}: {error}") from None
    return spec


def check_rules(rules):
    """The rules as a list of (pattern, TensorSpec fields); ValueError naming rules[i] and what
    to do for the first that is unusable. None is no rules.

    A rule is a (pattern, value) pair: a str pattern is a glob on the whole path, a compiled
    re.Pattern is searched in it; the value is a scheme ({"heNormal": {}}) or TensorSpec fields
    ({"init": ..., "fanIn": "64"}, "name" renames the tensor), anything but a slice."""
    if rules is None:
        return []
    if isinstance(rules, Mapping | str) or not isinstance(rules, Sequence):
        # ValueError for every bad argument of the jax/flax/keras entry points, types too.
        raise ValueError(f"rules: must be a list of (pattern, value) pairs, got {rules!r}")  # noqa: TRY004
    checked = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            raise ValueError(f"rules[{index}]: must be a (pattern, value) pair, got {rule!r}")
        pattern, value = rule
        if not isinstance(pattern, str | re.Pattern):
            raise ValueError(  # noqa: TRY004
                f"rules[{index}]: the pattern must be a glob str or a re.Pattern, got {pattern!r}"
            )
        checked.append((pattern, as_spec(value, f"rules[{index}] ({pattern!r})")))
    return checked


def rule_for(name, rules):
    """The TensorSpec fields of the first rule matching `name`, {} if none does. A str pattern is
    a glob on the whole name, a compiled re.Pattern is searched in it. The values may be raw
    (a scheme) or already checked: as_spec gives the same fields for both."""
    for pattern, value in rules:
        if isinstance(pattern, re.Pattern):
            matched = pattern.search(name) is not None
        else:
            matched = fnmatch.fnmatchcase(name, pattern)
        if matched:
            return as_spec(value, f"rules[{pattern!r}]")
    return {}


def request_name(path, names):
    """The tensor name of the parameter at `path`: names[path] or names(path), else the path."""
    if names is None:
        return path
    if isinstance(names, Mapping):
        return names.get(path, path)
    return names(path)


def check_names(names, paths):
    """Raises ValueError if `names` is neither None, a Mapping nor a callable, or maps a path that
    is not one of `paths` (a misspelt path would otherwise be silently ignored)."""
    if names is None or isinstance(names, Callable) and not isinstance(names, Mapping):
        return
    if not isinstance(names, Mapping):
        raise TypeError(f"names: must be a mapping or a callable, got {type(names).__name__}")
    unknown = sorted(set(names) - set(paths))
    if unknown:
        raise ValueError(f"names: no parameter has the paths {unknown}; paths are {list(paths)}")


def dtype_name(dtype, what):
    """The DType name of a numpy-compatible dtype (jnp.bfloat16, "float32", np.float16, ...)."""
    try:
        key = np.dtype(dtype).name
    except TypeError:
        key = str(dtype)
    if key not in _DTYPE_NAMES:
        raise ValueError(f"{what}: weightinit serves {sorted(_DTYPE_NAMES)}, not {dtype}")
    return _DTYPE_NAMES[key]


def numpy_dtype(name):
    """The numpy dtype of a DType name; bfloat16 is ml_dtypes.bfloat16 (what jnp.bfloat16 is)."""
    if name == "DTYPE_BFLOAT16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({v: k for k, v in _DTYPE_NAMES.items()}[name])


def layout_name(layout):
    """The Layout name of "torch" or "keras"; None stays None (the server's default, TORCH)."""
    if layout is None:
        return None
    if layout not in _LAYOUTS:
        raise ValueError(f'layout: must be "torch", "keras" or None, got {layout!r}')
    return _LAYOUTS[layout]


def view_shape(spec):
    """The shape of what the server sends for `spec` without a slice: shape, permuted."""
    shape = [int(n) for n in spec["shape"]]
    permute = spec.get("permute")
    return tuple(shape[p] for p in permute) if permute else tuple(shape)


def torch_kernel(shape):
    """TensorSpec fields giving a [*kernel, in, out] kernel the values of the PyTorch weight
    [out, in, *kernel] of the same name (Linear, ConvNd): that tensor with torch's default init,
    served through the permute that maps it back (Dense [1, 0], 2-D conv [2, 3, 1, 0])."""
    rank = len(shape)
    return {
        "shape": [shape[-1], shape[-2], *shape[:-2]],
        "permute": [*range(2, rank), 1, 0],
        "layout": "LAYOUT_TORCH",
        "init": {"torchDefault": {}},
    }


def torch_bias(kernel_shape):
    """TensorSpec fields of the bias of a layer with a [*kernel, in, out] kernel, as PyTorch
    initializes it: torchDefaultBias with fanIn = in * prod(kernel)."""
    return {
        "init": {"torchDefaultBias": {}},
        "fanIn": str(kernel_shape[-2] * math.prod(kernel_shape[:-2])),
    }


def missing_init_error(missing, example, hint=""):
    """The ValueError for parameters that got no init; `hint` says what else would do."""
    return ValueError(
        "no initializer for " + ", ".join(missing) + f": add rules, e.g. rules=[{example}]" + hint
    )
