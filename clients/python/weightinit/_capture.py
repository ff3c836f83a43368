"""Runs a model's own init code with every write into its parameters and buffers deferred.

What each parameter and buffer receives is recorded as a Program: a head that sets every element
(a draw to be served, a constant, a copy of computed values, or a refusal) followed by exact steps
(a multiplication by a Python scalar, constant rows such as a padding row). weightinit.torch then
serves the draws, deterministically and sharded, and replays the rest. Nothing of the model is
written while its code runs, so a refusal leaves the model as it was.

Draws are understood at the level that carries their meaning: torch.nn.init's functions (also
where transformers re-exports them) and timm's map to the matching served scheme with torch's fan
rules; Tensor.normal_ / uniform_ to plain distributions; fill_ / zero_ / copy_ / constant_ to
constants and copies. Views of a parameter (`.data`, `weight[padding_idx]`) are followed on a meta
shadow of it, so that a DTensor is never redistributed and a meta model can be recorded.
"""

import inspect
import math
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._rules import DISTRIBUTIONS, FAN_MODES


@dataclass(frozen=True)
class Draw:
    """A served draw: `init` is the Init in proto3 JSON, `fields` other TensorSpec fields (fans),
    `call` the native call it stands for, as a user reads it."""

    init: dict
    call: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Fill:
    value: Any


@dataclass(frozen=True)
class Copy:
    """Values the init code computed (a RoPE cache): a CPU tensor, or a meta one when they were
    computed on the meta device and are unknown."""

    source: torch.Tensor


@dataclass(frozen=True)
class Refused:
    op: str
    reason: str


@dataclass(frozen=True)
class Scale:
    """`tensor.<op>(value)` with a Python scalar: exact, the same bits on every device."""

    op: str
    value: float


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of dim 0 set to `value` (an embedding's padding row)."""

    start: int
    stop: int
    value: Any


Head = Draw | Fill | Copy | Refused | None
Step = Scale | Rows


@dataclass
class Program:
    """What one tensor received: `head` sets every element (None: nothing did), `steps` follow."""

    head: Head = None
    steps: list = field(default_factory=list)

    def reset(self, head):
        self.head, self.steps = head, []

    def then(self, step):
        if not isinstance(self.head, Refused):
            self.steps.append(step)


class InitRefused(ValueError):
    """The init code did something to a parameter that weightinit cannot serve or replay."""


# Tensor methods, by name, that read only metadata.
_METADATA = {
    "dim",
    "size",
    "numel",
    "nelement",
    "stride",
    "storage_offset",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "element_size",
    "__len__",
    "ndimension",
    "get_device",
    "_is_view",
    "__hash__",
    "data_ptr",
    "requires_grad_",
    "type",
    "_has_compatible_shallow_copy_type",
    "is_same_size",
}
_VIEWS = {
    "__getitem__",
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "t",
    "transpose",
    "permute",
    "narrow",
    "select",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "as_strided",
    "detach",
    "contiguous",
    "chunk",
    "split",
    "unbind",
    "diagonal",
    "data.__get__",
    "T.__get__",
    "mT.__get__",
}
# New tensors shaped like their argument: no value of it is read.
_FACTORIES = {
    "new_tensor",
    "new_empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
}
_UNINITIALIZED = {"empty", "empty_like", "new_empty", "empty_strided"}
# Draws that make a new tensor, and in-place draws with no served counterpart.
_RANDOM = {
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "bernoulli",
    "multinomial",
    "poisson",
    "rand_like",
    "randn_like",
    "randint_like",
    "bernoulli_",
    "random_",
    "exponential_",
    "cauchy_",
    "log_normal_",
    "geometric_",
    "normal_",
    "uniform_",
}
_SCALES = {"mul_", "div_", "add_", "sub_"}
# Ops that only rearrange elements: a result of drawn inputs is a draw of the same distribution.
_REARRANGE = (_VIEWS - {"expand", "expand_as", "as_strided", "diagonal"}) | {
    "cat",
    "concat",
    "concatenate",
    "stack",
    "clone",
}
_STRUCTURED = {"orthogonal", "eye", "identity", "dirac", "sparse"}
_PLAIN = {"normal", "uniform", "truncatedNormal"}  # schemes whose values need no fans
# Conversions that return the tensor itself when nothing changes (Module.to on a module).
_CONVERSIONS = {"to", "cpu", "cuda", "float", "half", "bfloat16", "double", "type_as"}
_NONLINEARITIES = {
    **dict.fromkeys(
        (
            "linear",
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_transpose1d",
            "conv_transpose2d",
            "conv_transpose3d",
        ),
        "NONLINEARITY_LINEAR",
    ),
    "sigmoid": "NONLINEARITY_SIGMOID",
    "tanh": "NONLINEARITY_TANH",
    "relu": "NONLINEARITY_RELU",
    "leaky_relu": "NONLINEARITY_LEAKY_RELU",
    "selu": "NONLINEARITY_SELU",
}
WHOLE = "whole"


def _func_name(func):
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__") and owner is not None:
        return f"{getattr(owner, '__name__', owner)}.{name}"
    return name


def _scalar(value):
    """A Python number from a number or a 0-d CPU tensor; None for anything else."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta:
        return value.item()
    return None


def _torch_fans(shape):
    """torch.nn.init._calculate_fan_in_and_fan_out for a shape."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


# ---- the served counterpart of each init function: (params bound to its signature) -> op ----


def _enum(table, value, what):
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise _NoCounterpart(f"{what} {value!r} has no served equivalent (one of {sorted(table)})")
    return table[key]


class _NoCounterpart(Exception):
    """A call whose arguments the served schemes cannot express."""


def _kaiming(scheme):
    def spec(p):
        return {
            scheme: {
                "a": float(p["a"]),
                "mode": _enum({k: FAN_MODES[k] for k in ("fan_in", "fan_out")}, p["mode"], "mode"),
                "nonlinearity": _enum(_NONLINEARITIES, p["nonlinearity"], "nonlinearity"),
            }
        }

    return spec


def _variance_scaling(p):
    return {
        "varianceScaling": {
            "scale": float(p["scale"]),
            "mode": _enum(FAN_MODES, p["mode"], "mode"),
            "distribution": _enum(DISTRIBUTIONS, p["distribution"], "distribution"),
        }
    }


def _trunc_normal_tf(p):
    # timm draws N(0, 1) truncated to [a, b], then scales by std and adds mean: the same
    # distribution as a truncated normal with absolute bounds mean + a * std, mean + b * std.
    mean, std = float(p["mean"]), float(p["std"])
    return {
        "truncatedNormal": {
            "mean": mean,
            "std": std,
            "a": mean + float(p["a"]) * std,
            "b": mean + float(p["b"]) * std,
        }
    }


def _fixed(init):
    return lambda p: init


# (module, function name) -> a function of the bound parameters giving the served Init, or a Fill.
_COUNTERPARTS: dict[tuple[str, str], Callable[[dict], Any]] = {
    ("torch.nn.init", "uniform_"): lambda p: {
        "uniform": {"low": float(p["a"]), "high": float(p["b"])}
    },
    ("torch.nn.init", "normal_"): lambda p: {
        "normal": {"mean": float(p["mean"]), "std": float(p["std"])}
    },
    ("torch.nn.init", "trunc_normal_"): lambda p: {
        "truncatedNormal": {k: float(p[k]) for k in ("mean", "std", "a", "b")}
    },
    # What trunc_normal_ calls: reached also when the public function was bound before the
    # capture began (torchtitan's param_init holds partial(nn.init.trunc_normal_, ...)).
    ("torch.nn.init", "_no_grad_trunc_normal_"): lambda p: {
        "truncatedNormal": {k: float(p[k]) for k in ("mean", "std", "a", "b")}
    },
    ("torch.nn.init", "constant_"): lambda p: Fill(p["val"]),
    ("torch.nn.init", "ones_"): lambda p: Fill(1.0),
    ("torch.nn.init", "zeros_"): lambda p: Fill(0.0),
    ("torch.nn.init", "eye_"): _fixed({"eye": {}}),
    ("torch.nn.init", "dirac_"): lambda p: {"dirac": {"groups": int(p["groups"])}},
    ("torch.nn.init", "xavier_uniform_"): lambda p: {"xavierUniform": {"gain": float(p["gain"])}},
    ("torch.nn.init", "xavier_normal_"): lambda p: {"xavierNormal": {"gain": float(p["gain"])}},
    ("torch.nn.init", "kaiming_uniform_"): _kaiming("kaimingUniform"),
    ("torch.nn.init", "kaiming_normal_"): _kaiming("kaimingNormal"),
    ("torch.nn.init", "orthogonal_"): lambda p: {"orthogonal": {"gain": float(p["gain"])}},
    ("torch.nn.init", "sparse_"): lambda p: {
        "sparse": {"sparsity": float(p["sparsity"]), "std": float(p["std"])}
    },
    ("timm.layers.weight_init", "trunc_normal_"): lambda p: {
        "truncatedNormal": {k: float(p[k]) for k in ("mean", "std", "a", "b")}
    },
    ("timm.layers.weight_init", "trunc_normal_tf_"): _trunc_normal_tf,
    ("timm.layers.weight_init", "variance_scaling_"): _variance_scaling,
    ("timm.layers.weight_init", "lecun_normal_"): _fixed({"lecunNormal": {}}),
}
# Where libraries keep their own references to torch's init functions, besides module globals.
_FUNCTION_TABLES = (("transformers.initialization", "TORCH_INIT_FUNCTIONS"),)


def _describe_call(name, params):
    shown = ", ".join(
        f"{k}={v!r}" for k, v in params.items() if k not in ("tensor", "generator", "self")
    )
    return f"{name}({shown})"


# ---- the capture ----------------------------------------------------------------------------


class _Root:
    """A tracked parameter or buffer: its program, and a meta tensor of its (global) shape on
    which views of it are computed."""

    def __init__(self, tensor, key):
        self.tensor, self.key, self.program = tensor, key, Program()
        self._shadow = None

    @property
    def shape(self):
        return tuple(self.tensor.shape)

    def shadow(self):
        if self._shadow is None:
            self._shadow = torch.empty(self.shape, dtype=self.tensor.dtype, device="meta")
        return self._shadow


_ACTIVE = threading.Lock()


class Capture(TorchFunctionMode):
    """The interception, as a context manager. `roots` ({id: (tensor, key)}) are the tensors
    whose writes are deferred; with `adopt`, every nn.Parameter written is adopted as a root
    (a constructor being recorded)."""

    def __init__(self, roots=(), adopt=False):
        super().__init__()
        self.roots = {id(t): _Root(t, key) for t, key in roots}
        self.adopt = adopt
        self._aliases = {}  # id(view) -> (view, root, region)
        self._tainted = {}  # id(tensor) -> (tensor, origin, Draw of every element or None)
        self._made = {}  # id(tensor) -> (tensor, "empty" | "value"), recording only
        self._patches = []
        self._by_original = {}  # torch's init function -> its served replacement

    # -- entering and leaving: patches of the init functions and layer defaults --

    def __enter__(self):
        if not _ACTIVE.acquire(blocking=False):
            raise RuntimeError("weightinit: another init is being captured in this process")
        try:
            self._patch()
            return super().__enter__()
        except BaseException:
            self._unpatch()
            _ACTIVE.release()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch()
            _ACTIVE.release()

    def _patch(self):
        replacements = {}
        for (module_name, name), counterpart in _COUNTERPARTS.items():
            module = sys.modules.get(module_name)
            original = getattr(module, name, None)
            if original is not None:
                replacements[original] = self._semantic(module_name, name, original, counterpart)
        # handle_torch_function passes the public function as its module global names it: the
        # original when it was bound before the capture, the replacement after.
        self._by_original = {**replacements, **{r: r for r in replacements.values()}}
        # Every module global bound to an original (`from torch.nn.init import normal_`).
        names = {original.__name__ for original in replacements}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for name in names & namespace.keys():
                value = namespace[name]
                if callable(value) and value in replacements:
                    self._set(namespace, name, replacements[value])
        for module_name, attribute in _FUNCTION_TABLES:
            table = getattr(sys.modules.get(module_name), attribute, None)
            for name, value in dict(table or {}).items():
                if value in replacements:
                    self._set(table, name, replacements[value])
        for layer in (nn.Linear, nn.modules.conv._ConvNd):
            original = layer.__dict__["reset_parameters"]
            self._patches.append((layer, "reset_parameters", original))
            layer.reset_parameters = self._affine_default(original)
        if self.adopt:
            original_new = nn.Parameter.__new__
            capture = self

            def new(cls, data=None, requires_grad=True):
                param = original_new(cls, data, requires_grad)
                made = capture._made.get(id(data))
                if made is not None:
                    capture._made[id(param)] = (param, made[1])
                return param

            self._patches.append((nn.Parameter, "__new__", original_new))
            nn.Parameter.__new__ = new

    def _set(self, namespace, name, value):
        self._patches.append((namespace, name, namespace[name]))
        namespace[name] = value

    def _unpatch(self):
        while self._patches:
            owner, name, original = self._patches.pop()
            if isinstance(owner, dict):
                owner[name] = original
            else:
                setattr(owner, name, original)

    # -- tensors: roots, views of them, temporaries --

    def lookup(self, tensor):
        """(root, region) for a tracked tensor, region WHOLE or (start, stop) rows or None for
        another part; None when the tensor is not tracked."""
        root = self.roots.get(id(tensor))
        if root is not None:
            return root, WHOLE
        alias = self._aliases.get(id(tensor))
        if alias is not None:
            return alias[1], alias[2]
        if self.adopt and isinstance(tensor, nn.Parameter):
            root = self.roots[id(tensor)] = _Root(tensor, None)
            return root, WHOLE
        return None

    def _alias(self, root, view):
        if isinstance(view, tuple | list):
            for item in view:
                self._alias(root, item)
        elif isinstance(view, torch.Tensor):
            self._aliases[id(view)] = (view, root, _region(view, root.shape))

    def _taint(self, result, origin, draw=None):
        if isinstance(result, torch.Tensor):
            self._tainted[id(result)] = (result, origin, draw)
        elif isinstance(result, tuple | list):
            for item in result:
                self._taint(item, origin, draw)

    def _taint_of(self, values):
        """(origin, draw) of the first drawn tensor among `values` (nested), None if none is."""
        for value in tree_leaves(values):
            hit = self._tainted.get(id(value)) if isinstance(value, torch.Tensor) else None
            if hit is not None:
                return hit[1:]
        return None

    def _propagated(self, name, values):
        """What a result of `name` over `values` holds: (origin, draw) when some input was drawn;
        the draw is kept when the op only rearranges elements that all have it (the pieces
        torchtitan's fused wqkv concatenates), so that the result is one draw of it."""
        tensors = [v for v in tree_leaves(values) if isinstance(v, torch.Tensor)]
        taints = [self._tainted.get(id(t)) for t in tensors]
        drawn = [t for t in taints if t is not None]
        if not drawn:
            return None
        draws = {(repr(t[2].init), repr(t[2].fields)) if t[2] else None for t in drawn}
        same = name in _REARRANGE and len(drawn) == len(taints) and len(draws) == 1
        return drawn[0][1], drawn[0][2] if same else None

    # -- what the init code does --

    def draw(self, root, region, view_shape, init, call, fields=None):
        fields = dict(fields or {})
        if region != WHOLE:
            root.program.reset(Refused(call, "draws into a part of it"))
            return
        if view_shape != root.shape and len(view_shape) >= 2 and not fields:
            # A draw into a reshaped view: its fans are the view's, torch's rule.
            fan_in, fan_out = _torch_fans(view_shape)
            fields = {"fanIn": str(fan_in), "fanOut": str(fan_out)}
        root.program.reset(Draw(init, call, fields))

    def fill(self, root, region, value, op):
        if region == WHOLE:
            root.program.reset(Fill(value))
        elif region is not None:
            root.program.then(Rows(region[0], region[1], value))
        else:
            root.program.reset(Refused(op, "writes a part of it that is not whole rows"))

    def copy(self, root, region, source, op):
        origin = self._taint_of((source,))
        if self.lookup(source) == (root, WHOLE) and region == WHOLE:
            return  # Module._apply setting a parameter's data to itself
        if origin is not None:
            origin, draw = origin
            if draw is not None and region == WHOLE and source.numel() == math.prod(root.shape):
                root.program.reset(Draw(draw.init, f"{draw.call}, copied in", draw.fields))
            else:
                root.program.reset(Refused(op, f"copies in values drawn by {origin}"))
        elif self.lookup(source) is not None:
            root.program.reset(Refused(op, "copies in another parameter's values"))
        elif region != WHOLE:
            root.program.reset(Refused(op, "copies into a part of it"))
        else:
            value = source.detach()
            value = value if value.is_meta else value.to("cpu", copy=True)
            root.program.reset(Copy(value.expand(root.shape) if value.dim() == 0 else value))

    def _semantic(self, module_name, name, original, counterpart):
        signature = inspect.signature(original)
        capture = self

        def served(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            tensor = params.get("tensor")
            hit = capture.lookup(tensor) if isinstance(tensor, torch.Tensor) else None
            call = _describe_call(f"{module_name}.{name}", params)
            try:
                op = counterpart(params)
            except _NoCounterpart as refusal:
                op = Refused(call, str(refusal))
            if hit is None:
                result = original(*args, **kwargs)
                if not isinstance(op, Fill):
                    capture._taint(tensor, call, _portable(op, call, tuple(tensor.shape)))
                return result
            root, region = hit
            if isinstance(op, Refused):
                root.program.reset(op)
                return tensor
            if isinstance(op, Fill):
                capture.fill(root, region, op.value, call)
            else:
                capture.draw(root, region, tuple(tensor.shape), op, call)
            return tensor

        served.__wrapped__ = original
        served.__name__ = name
        return served

    def _affine_default(self, original):
        capture = self

        def reset_parameters(layer):
            """PyTorch's default of nn.Linear and nn.ConvNd, served as torchDefault and
            torchDefaultBias: the bytes weightinit has always given these layers."""
            hit = capture.lookup(layer.weight)
            if hit is None:
                return original(layer)
            capture.draw(
                *hit,
                tuple(layer.weight.shape),
                {"torchDefault": {}},
                "torch.nn.init.kaiming_uniform_(a=math.sqrt(5))",
            )
            if layer.bias is not None:
                fan_in = _torch_fans(tuple(layer.weight.shape))[0]
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                capture.draw(
                    *capture.lookup(layer.bias),
                    tuple(layer.bias.shape),
                    {"torchDefaultBias": {}},
                    f"torch.nn.init.uniform_(a={-bound!r}, b={bound!r})",
                    {"fanIn": str(fan_in)},
                )

        return reset_parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        served = self._by_original.get(func)
        if served is not None:  # an init function reached through handle_torch_function
            return served(*args, **kwargs)
        name = _func_name(func)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        hit = self.lookup(target) if target is not None else None
        if hit is None:
            for value in (*args[1:], *kwargs.values()):
                other = self.lookup(value) if isinstance(value, torch.Tensor) else None
                if other is not None:
                    return self._refuse_read(other[0], name)
            return self._untracked(func, name, target, args, kwargs)
        root, region = hit
        if name in _METADATA or name in _FACTORIES:
            return func(*args, **kwargs)
        if name.endswith((".__get__", ".__set__")) and name not in (*_VIEWS, "data.__set__"):
            return func(*args, **kwargs)  # metadata: shape, requires_grad, grad, ...
        if name in _CONVERSIONS:
            result = func(*args, **kwargs)
            return result if result is target else self._refuse_read(root, name)
        if name in _VIEWS:
            base = root.shadow() if id(target) in self.roots else target
            if name in ("data.__get__", "detach", "contiguous") and base is not target:
                view = base
            else:
                view = func(base, *args[1:], **kwargs)
            self._alias(root, view)
            return view
        shape = tuple(target.shape)
        if name == "normal_":
            mean, std = _bound(args, kwargs, (("mean", 0.0), ("std", 1.0)))
            init = {"normal": {"mean": mean, "std": std}}
            self.draw(root, region, shape, init, f"Tensor.normal_(mean={mean!r}, std={std!r})")
        elif name == "uniform_":
            low, high = _bound(args, kwargs, (("from", 0.0), ("to", 1.0)))
            init = {"uniform": {"low": low, "high": high}}
            self.draw(root, region, shape, init, f"Tensor.uniform_(from={low!r}, to={high!r})")
        elif name == "zero_":
            self.fill(root, region, 0.0, name)
        elif name == "fill_":
            value = _scalar(args[1] if len(args) > 1 else kwargs.get("value"))
            if value is None:
                root.program.reset(Refused(name, "fills with a tensor's values"))
            else:
                self.fill(root, region, value, name)
        elif name == "__setitem__":
            base = root.shadow() if id(target) in self.roots else target
            part = _region(base[args[1]], root.shape)
            value = _scalar(args[2])
            if value is not None:
                self.fill(root, part, value, "__setitem__")
            else:
                self.copy(root, part, args[2], "__setitem__")
            return None
        elif name in ("copy_", "data.__set__"):
            self.copy(root, region, args[1], name)
            return None if name == "data.__set__" else target
        elif name in _SCALES and region == WHOLE and set(kwargs) <= {"alpha"}:
            value, alpha = _scalar(args[1]) if len(args) > 1 else None, kwargs.get("alpha", 1)
            if value is None or self._taint_of(args[1:]) is not None:
                root.program.reset(Refused(name, "applies a tensor to a served draw"))
            else:
                root.program.then(Scale(name, value * alpha if alpha != 1 else value))
        elif name.endswith("_") and not name.startswith("__"):
            root.program.reset(
                Refused(name, "is not exact across devices or has no served equivalent")
            )
        else:
            return self._refuse_read(root, name)
        return target

    def _untracked(self, func, name, target, args, kwargs):
        result = func(*args, **kwargs)
        taint = self._propagated(name, (args, kwargs))
        if name in _RANDOM:
            origin = f"torch.{name}" if target is None else f"Tensor.{name}"
            taint = (origin, _portable(_plain_draw(name, args, kwargs), origin, ()))
        if taint is not None:
            self._taint(result, *taint)
            if target is not None and name.endswith("_"):
                self._taint(target, *taint)
        elif self.adopt:
            kind = "empty" if name in _UNINITIALIZED else "value"
            if isinstance(result, torch.Tensor):
                self._made[id(result)] = (result, kind)
            if target is not None and name.endswith("_") and id(target) in self._made:
                self._made[id(target)] = (target, "value")
        return result

    def _refuse_read(self, root, name):
        raise InitRefused(
            f"{_label(root)}: the init code reads its values ({name}) while weightinit defers "
            "every write until the draws are served; initialize it without reading it, or give "
            "it a rule"
        )

    def made(self, tensor):
        """How a tensor not written by init code was made while recording: "empty"
        (uninitialized memory), "value", or None when unknown."""
        entry = self._made.get(id(tensor))
        return entry[1] if entry is not None else None


def _plain_draw(name, args, kwargs):
    """The Init of a plain draw into a new tensor or a temporary, None for other draws."""
    if name == "normal_":
        mean, std = _bound(args, kwargs, (("mean", 0.0), ("std", 1.0)))
        return {"normal": {"mean": mean, "std": std}}
    if name == "uniform_":
        low, high = _bound(args, kwargs, (("from", 0.0), ("to", 1.0)))
        return {"uniform": {"low": low, "high": high}}
    return {"randn": {"normal": {}}, "rand": {"uniform": {}}}.get(name)


def _portable(init, call, shape):
    """A draw into a temporary as a Draw that can serve a parameter its elements are copied
    into: with the temporary's fans made explicit; None for structured schemes (an orthogonal
    matrix reshaped is not one) and what is not a draw."""
    if not isinstance(init, dict) or set(init) & _STRUCTURED:
        return None
    fields = {}
    if len(shape) >= 2 and not set(init) & _PLAIN:
        fan_in, fan_out = _torch_fans(shape)
        fields = {"fanIn": str(fan_in), "fanOut": str(fan_out)}
    return Draw(init, call, fields)


def _label(root):
    return root.key if isinstance(root.key, str) else "a parameter"


def _bound(args, kwargs, names):
    values = []
    for index, (name, default) in enumerate(names, start=1):
        value = args[index] if len(args) > index else kwargs.get(name, default)
        values.append(float(_scalar(value)))
    return values


def _region(view, shape):
    """Which part of a tensor of `shape` (contiguous) the view covers: WHOLE (every element,
    possibly reshaped), (start, stop) for whole rows of dim 0, None for any other part."""
    numel = math.prod(shape)
    if view.storage_offset() == 0 and view.numel() == numel and view.is_contiguous():
        return WHOLE
    if not shape or not view.is_contiguous() or view.numel() == 0:
        return None
    row = math.prod(shape[1:])
    offset = view.storage_offset()
    if row and offset % row == 0 and view.numel() % row == 0:
        return (offset // row, offset // row + view.numel() // row)
    return None


@contextmanager
def captured(roots, adopt=False):
    """Runs the block under a Capture; yields it."""
    capture = Capture(roots, adopt)
    with torch.no_grad(), capture:
        yield capture
