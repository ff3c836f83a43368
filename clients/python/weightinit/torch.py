"""Initialize torch modules with their own init code, every random draw served by weightinit.

    import weightinit.torch
    weightinit.torch.init_module(model, seed=42, target="127.0.0.1:50051")

init_module runs the model's own initialization (transformers' weight init, an `init_weights()`
method as torchtitan has, else each layer's `reset_parameters()`, or `init=` any callable) with
every write into its parameters and buffers deferred. Each random draw becomes one tensor of a
request, served deterministically (the same bytes in every process, layout and framework);
everything else the code does is replayed as written: constants, copies of computed buffers (RoPE
caches), padding rows, exact scalar scaling after a draw. What cannot be served or replayed exactly
is refused, by parameter name, before anything is written.

Models that initialize in their constructor (nanoGPT, torchvision, timm, PEFT, most research code)
are recorded as they are built and replayed later, into materialized and sharded parameters:

    with weightinit.torch.recording():
        with torch.device("meta"):
            model = GPT(config)
    fully_shard(model); model.to_empty(device="cpu")
    weightinit.torch.init_module(model, seed=42, target="local")

Tensors are named by their qualified names (`0.weight`, `encoder.fc1.bias`, ...) without the
attribute names of wrappers (torch.compile's `_orig_mod`, DDP's `module`, FSDP's and checkpoint
wrappers'), so the same model and seed give the same bytes in every process, wrapped or not.
`prefix=` puts a model's names in a namespace of their own. DTensor parameters (FSDP2's
fully_shard, tensor parallel's parallelize_module) are filled from their placements: each process
fetches only the block it holds.
"""

import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import blake3
import numpy as np
import torch
from torch import nn

from ._capture import Copy, Draw, Fill, InitRefused, Program, Refused, Scale, captured
from ._rules import check_rules, rule_for
from ._verify import verify
from .client import Client, shared_client
from .errors import RequestRefused
from .request import check_seed

__all__ = [
    "InitRefused",
    "build_request",
    "init_module",
    "recording",
    "shard_plan",
    "tensor_digest",
    "verify",
]

_DTYPES = {
    torch.float32: "DTYPE_FLOAT32",
    torch.float64: "DTYPE_FLOAT64",
    torch.float16: "DTYPE_FLOAT16",
    torch.bfloat16: "DTYPE_BFLOAT16",
}
_RECORD = "_weightinit_record"


def init_module(
    module: nn.Module,
    seed: int,
    target,
    rules=None,
    rank: int | None = None,
    world_size: int | None = None,
    dtype: torch.dtype | None = None,
    plan=None,
    timeout: float | None = None,
    *,
    security=None,
    prefix: str | None = None,
    init: Callable[[nn.Module], object] | None = None,
    buffer_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Initializes `module` with its own init code, the random draws served from `target`.

    seed: the experiment's seed, in 0..2**64-1 (an int, a NumPy integer or a 0-d torch integer).
    target: "host:port", "local" (the engine in this process), or a weightinit.Client (then
        `security` is the client's).
    rules, prefix, init, buffer_device: see build_request().
    dtype: a torch dtype to generate every draw in (default: each tensor's own dtype); the
        values are then cast into the parameter.
    timeout: seconds for the Generate call; None for the client's default deadline.
    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.

    The module must be materialized (`module.to_empty(device=...)` after building it on the meta
    device), except when sharding with a plan, which reads shapes only. Models that declare tied
    weights the way transformers does are tied again first (to_empty unties them); a tied
    parameter is fetched once. Raises ValueError (InitRefused) naming every parameter and buffer
    the init code leaves unwritten, or writes in a way weightinit cannot serve, before anything is
    written.

    Without rank, world_size or plan: writes every parameter and buffer the init writes, in
    place (draws straight into CPU parameters' memory when the dtypes agree), and returns
    {name: parameter}. A DTensor parameter gets the block its placements give this process;
    its full_tensor() is then the single-process init.

    Sharded, with rank and world_size and/or plan (plain tensors only): leaves the module
    untouched and returns {name: local shard} of every parameter (names as
    module.named_parameters() gives them). The default plan, from rank and world_size, shards
    every parameter of rank >= 1 along dim 0 with torch.chunk semantics; plan(name, parameter)
    returns a Slice in proto3 JSON form ({"shard": ...}, {"dims": ...} or {"flat": ...}), or
    None for the whole tensor.
    """
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size go together")
    if world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if plan is None:
            plan = shard_plan(rank, world_size)
    planned = _plan(module, seed, rules, dtype, plan, prefix, init, buffer_device, plan is not None)
    client = _client(target, security)
    if plan is not None:
        shards = {}
        for entry in planned.entries:
            if not entry.is_buffer:
                shape = entry.block_shape()
                shards[entry.qualified] = torch.empty(shape, dtype=dtype or entry.dtype)
        planned.write(client, timeout, {e: shards.get(e.qualified) for e in planned.entries})
        return shards
    with torch.no_grad():
        planned.write(client, timeout, {e: _local_tensor(e.tensor) for e in planned.entries})
    return {e.qualified: e.tensor for e in planned.entries if not e.is_buffer}


def build_request(
    module: nn.Module,
    seed: int,
    rules=None,
    dtype: torch.dtype | None = None,
    plan=None,
    *,
    prefix: str | None = None,
    init: Callable[[nn.Module], object] | None = None,
    buffer_device: torch.device | str | None = None,
) -> dict:
    """Returns the GenerateRequest, in proto3 JSON form, of the draws `module`'s init makes.

    Runs the init code as init_module() does (writing nothing; the module may be on the meta
    device) and returns one tensor per
    parameter or buffer whose last whole write is a random draw, named by its qualified name
    without wrapper attributes (`_orig_mod.`, `module.`, ...); constants and computed values
    are not requested.
    init: the entry point, called as init(module); default: transformers' weight init for a
        transformers model, an `init_weights()` method (torchtitan's convention; given
        `buffer_device` when it takes one), else every module's `reset_parameters()`, children
        first. What recording() recorded for a parameter takes precedence.
    rules: a list of (pattern, value) matched against those names (before `prefix`); the first
        pattern that matches replaces the tensor's draw (or whatever it received). A str pattern
        is a glob matching the whole name ("*.bias"); a compiled re.Pattern is searched in the
        name. A value whose keys are scheme names is the Init ({"xavierUniform": {}}); a value
        whose keys are TensorSpec fields overrides them ({"init": {"normal": {"std": 0.02}},
        "fanIn": "64"}). Mixing the two is a ValueError.
    prefix: prepended with a dot to every tensor name, so that two models with the same
        parameter names (an actor and a critic) get different weights.
    dtype, plan: see init_module(). A DTensor parameter's slice is the block of it this process
        holds, from its placements; plan does not apply to them.
    """
    return _plan(module, seed, rules, dtype, plan, prefix, init, buffer_device, True).request


@contextmanager
def recording() -> Iterator[None]:
    """Records what each parameter and buffer of the modules built inside receives from their
    constructors (on the meta device or any other), by qualified name, on the outermost module
    built. A later init_module() of that model (after fully_shard, parallelize_module, to_empty,
    wrapping) replays it: the draws served, the rest as written. Values computed on a real device
    (buffers, parameters made with torch.ones(...)) are kept; values computed on the meta device
    are unknown and must be written by the model's init code or a rule."""
    parents, children = {}, set()

    def on_module(parent, name, child):
        parents.setdefault(id(parent), parent)
        if child is not None:
            children.add(id(child))

    def on_tensor(owner, name, tensor):
        parents.setdefault(id(owner), owner)

    from torch.nn.modules import module as torch_module

    handles = [
        torch_module.register_module_module_registration_hook(on_module),
        torch_module.register_module_parameter_registration_hook(on_tensor),
        torch_module.register_module_buffer_registration_hook(on_tensor),
    ]
    try:
        with captured((), adopt=True) as capture, _transformers_init_on_meta():
            yield
    finally:
        for handle in handles:
            handle.remove()
    for key, root in parents.items():
        if key not in children:
            setattr(root, _RECORD, _recorded(root, capture))


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex BLAKE3 of the tensor's elements (row-major, little-endian), as the Digest RPC
    computes it for the same request: compare with weightinit.digest(). For a DTensor, the
    digest of the block this process holds, which build_request() asks for."""
    data = _local_tensor(tensor).detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return blake3.blake3(data.numpy().reshape(-1).view(np.uint8)).hexdigest()


def shard_plan(rank: int, world_size: int):
    """The default sharding plan: dim 0 of every tensor of rank >= 1, torch.chunk semantics."""

    def plan(name, param):
        if param.dim() == 0:
            return None
        return {"shard": {"dim": 0, "index": rank, "count": world_size}}

    return plan


# ---- recording and running the model's own init ---------------------------------------------


@contextmanager
def _transformers_init_on_meta():
    """transformers skips its weight init when a model is built on the meta device; while
    recording nothing is written, so it runs, and the record holds what it would draw."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None:
        yield
        return
    model_class = modeling.PreTrainedModel
    original = model_class.init_weights

    def init_weights(self):
        self.initialize_weights()
        self.tie_weights(recompute_mapping=False)

    model_class.init_weights = init_weights
    try:
        yield
    finally:
        model_class.init_weights = original


def _recorded(root, capture):
    """{qualified name: Program} of every parameter and buffer of `root` built while recording.
    What no init code wrote is what the constructor made: kept when it was made on a real device
    (as a constant when every element is the same), unknown (a meta Copy) on the meta device,
    and nothing (None) when it is uninitialized memory (torch.empty)."""
    programs = {}
    for qualified, tensor in (
        *root.named_parameters(remove_duplicate=False),
        *root.named_buffers(remove_duplicate=False),
    ):
        tracked = capture.roots.get(id(tensor))
        if tracked is not None and tracked.program.head is not None:
            programs[qualified] = tracked.program
        elif capture.made(tensor) != "empty":
            programs[qualified] = Program(_made_value(tensor))
    return programs


def _made_value(tensor):
    data = tensor.detach()
    if data.is_meta:
        return Copy(data)
    flat = data.reshape(-1)
    if flat.numel() and bool((flat == flat[0]).all()):
        return Fill(flat[0].item())
    return Copy(data.to("cpu", copy=True))


def _records(module):
    """{qualified name from `module`: Program} that recording() left on it and its submodules."""
    programs = {}
    for path, sub in module.named_modules():
        for name, program in getattr(sub, _RECORD, {}).items():
            programs[f"{path}.{name}" if path else name] = program
    return programs


def _own_init(module, init, buffer_device):
    """The model's own init entry point, as a function of no arguments."""
    if init is not None:
        if not callable(init):
            raise TypeError(f"init: must be callable as init(module), got {init!r}")
        return lambda: init(module)
    hf = _outermost(module, _is_transformers_model)
    if hf:
        return lambda: [_transformers_init(model) for model in hf]
    method = getattr(module, "init_states", None) or getattr(module, "init_weights", None)
    if callable(method):
        if buffer_device is not None:
            if "buffer_device" not in inspect.signature(method).parameters:
                raise ValueError(
                    f"buffer_device: {type(module).__name__}.{method.__name__}() takes no "
                    "buffer_device"
                )
            return lambda: method(buffer_device=buffer_device)
        return method
    if buffer_device is not None:
        raise ValueError(
            "buffer_device: the model has no init_states() or init_weights() to give it to"
        )
    return lambda: _reset_all(module)


def _outermost(module, predicate):
    found = []
    for path, sub in module.named_modules():
        if predicate(sub) and not any(path.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((path, sub))
    return [sub for _, sub in found]


def _is_transformers_model(module):
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(module, modeling.PreTrainedModel)


def _transformers_init(model):
    """What transformers' init_weights() does: its weight init over untied parameters (tied ones
    are tied afterwards, so the source's init stands), the flags that make it skip modules and
    tensors already initialized cleared first. Runs inside _restored(), which puts the ties back."""
    for sub in model.modules():
        sub.__dict__.pop("_is_hf_initialized", None)
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.__dict__.pop("_is_hf_initialized", None)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        path, _, local = target.rpartition(".")
        owner = model.get_submodule(path)
        param = owner._parameters.get(local)
        if param is not None and param is model.get_parameter(source):
            # The native init drew into a separate tensor that tying then discarded.
            owner._parameters[local] = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"),
                requires_grad=param.requires_grad,
            )
    model.initialize_weights()


def _reset_all(module):
    """torch's layer defaults: every module's reset_parameters() (MultiheadAttention's and
    Transformer's _reset_parameters()), children before their parents, as construction runs them."""
    for child in module.children():
        _reset_all(child)
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if callable(reset):
        reset()


@contextmanager
def _restored(module):
    """Puts back every module's attributes, parameters and buffers as they were: the init code's
    assignments (a buffer recomputed, a flag set) are replayed by init_module, not kept."""
    saved = [
        (sub, dict(sub.__dict__), dict(sub._parameters), dict(sub._buffers))
        for sub in module.modules()
    ]
    try:
        yield
    finally:
        for sub, attributes, params, buffers in saved:
            sub.__dict__.clear()
            sub.__dict__.update(attributes)
            sub._parameters.clear()
            sub._parameters.update(params)
            sub._buffers.clear()
            sub._buffers.update(buffers)


def _run_own_init(module, tensors, init, buffer_device):
    """{qualified name: Program} for `tensors` ({qualified: tensor}) from the model's init code,
    what recording() left taking precedence."""
    programs = _records(module)
    if all(_known(programs.get(name)) for name in tensors):
        return programs
    entry = _own_init(module, init, buffer_device)
    adapters = _peft_adapters(module) if init is None else {}
    with _restored(module):
        with captured([(t, name) for name, t in tensors.items()]) as capture:
            entry()
        # Tensors the init code replaced by new ones (torchtitan's freqs_cis) are copies.
        current = dict(
            (
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            )
        )
    merged = {}
    for name, tensor in tensors.items():
        now = current.get(name)
        if now is not None and now is not tensor:
            if isinstance(now, nn.Parameter):
                ran = Program(Refused("setattr", "replaces the parameter by a new tensor"))
            else:
                ran = Program(_made_value(now))
        else:
            ran = capture.roots[id(tensor)].program
        recorded = programs.get(name)
        if name in adapters and not _known(recorded):
            ran = Program(Refused("PEFT", adapters[name]))
        if _known(recorded) or recorded is not None and ran.head is None and not ran.steps:
            merged[name] = recorded
        else:
            merged[name] = ran
    return merged


def _peft_adapters(module):
    """{qualified name: why} of PEFT adapter parameters: PEFT initializes them in its
    constructor (LoRA's B as zeros, ...), which no entry point reruns; the base model's init
    would draw them as the layers they wrap."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return {}
    found = {}
    for path, sub in module.named_modules():
        if isinstance(sub, tuners.BaseTunerLayer):
            for name, _ in sub.named_parameters(prefix=path):
                if not name[len(path) :].startswith(".base_layer."):
                    found[name] = (
                        f"is an adapter of {type(sub).__name__}, which PEFT initializes when it "
                        "builds the model: build it inside weightinit.torch.recording()"
                    )
    return found


def _known(program):
    if program is None or program.head is None:
        return False
    return not (isinstance(program.head, Copy) and program.head.source.is_meta)


# ---- the plan: what is served, what is replayed ---------------------------------------------


@dataclass(eq=False)
class _Entry:
    """One parameter or buffer: its program, the request's tensor for its draw (None when it
    is not drawn) and the block of it this process writes (ranges per dim, a flat (start, stop)
    range, or None for the whole tensor)."""

    qualified: str
    name: str
    tensor: torch.Tensor
    program: Program
    spec: dict | None
    block: list | tuple | None
    is_buffer: bool

    @property
    def dtype(self):
        return self.tensor.dtype

    def block_shape(self):
        if self.block is None:
            return tuple(self.tensor.shape)
        if isinstance(self.block, tuple):
            return (self.block[1] - self.block[0],)
        return tuple(len(r) for r in self.block)

    def take(self, source):
        """The part of a full-shaped tensor this entry's block selects."""
        if self.block is None:
            return source
        if isinstance(self.block, tuple):
            return source.reshape(-1)[self.block[0] : self.block[1]]
        return source[tuple(slice(r.start, r.stop) for r in self.block)]

    def rows(self, dest, start, stop):
        """The part of `dest` (this entry's block) holding rows [start, stop) of dim 0."""
        if self.block is None:
            return dest[start:stop]
        if isinstance(self.block, tuple):
            width = math.prod(self.tensor.shape[1:])
            low, high = max(self.block[0], start * width), min(self.block[1], stop * width)
            return dest[max(low - self.block[0], 0) : max(high - self.block[0], 0)]
        first = self.block[0]
        low, high = max(first.start, start), min(first.stop, stop)
        return dest[max(low - first.start, 0) : max(high - first.start, 0)]


@dataclass
class _Plan:
    request: dict
    entries: list

    def write(self, client, timeout, destinations):
        """Serves the draws into `destinations` ({entry: tensor of its block}, None to skip),
        then writes constants and copies and replays the exact steps."""
        drawn = [e for e in self.entries if e.spec is not None and destinations.get(e) is not None]
        out = {}
        for entry in drawn:
            view = _writable_view(destinations[entry], entry.spec["dtype"])
            if view is not None:
                out[entry.spec["name"]] = view
        fetched = {}
        if drawn:
            request = {**self.request, "tensors": [e.spec for e in drawn]}
            try:
                fetched = client.fetch(request, out=out, timeout=timeout)
            except RequestRefused as refused:
                raise _named(refused, drawn) from refused
            except BaseException as failed:
                if out:
                    failed.add_note(
                        "weightinit.torch.init_module: nothing but the draws of "
                        f"{', '.join(e.qualified for e in drawn if e.spec['name'] in out)} "
                        "may have been written, in part"
                    )
                raise
        for entry in self.entries:
            dest = destinations.get(entry)
            if dest is None:
                continue
            head = entry.program.head
            if isinstance(head, Draw):
                if entry.spec["name"] not in out:
                    dest.copy_(_as_tensor(fetched[entry.spec["name"]]).reshape(dest.shape))
            elif isinstance(head, Fill):
                dest.fill_(head.value)
            elif isinstance(head, Copy):
                dest.copy_(entry.take(head.source).reshape(dest.shape))
            for step in entry.program.steps:
                if isinstance(step, Scale):
                    getattr(dest, step.op)(step.value)
                else:
                    entry.rows(dest, step.start, step.stop).fill_(step.value)


def _named(refused, drawn):
    """A server's refusal naming the parameter rather than the request's index."""
    match = re.match(r"tensors\[(\d+)\]\.?(.*)", refused.field or "")
    if match is None:
        return refused
    entry = drawn[int(match.group(1))]
    field = f"{entry.qualified}.{match.group(2)}" if match.group(2) else entry.qualified
    reason = refused.details().removeprefix(f"{refused.field}: ")
    return ValueError(f"{field}: {reason} (drawn by {entry.program.head.call})")


def _plan(module, seed, rules, dtype, plan, prefix, init, buffer_device, meta_ok=False):
    seed = check_seed(seed)
    rules = _checked_rules(rules)
    if prefix is not None and (not isinstance(prefix, str) or not prefix or prefix[-1] == "."):
        raise ValueError(f"prefix: must be a non-empty str not ending with '.', got {prefix!r}")
    _check_materialized(module, meta_ok)
    if plan is None:
        _tie_declared_weights(module)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    programs = _run_own_init(module, {**params, **buffers}, init, buffer_device)
    entries, refusals, untouched, seen = [], [], [], {}
    for qualified, tensor in (*params.items(), *buffers.items()):
        is_buffer = qualified not in params
        name = _unwrapped_name(module, qualified)
        if name in seen:
            raise ValueError(f"parameters {seen[name]!r} and {qualified!r} both unwrap to {name!r}")
        seen[name] = qualified
        program = _ruled(programs.get(qualified) or Program(), name, rules)
        head = program.head
        problem = _problem(program, is_buffer)
        if problem is not None:
            refusals.append((qualified, None if is_buffer else name, tensor, problem))
            continue
        if head is None:
            untouched.append(qualified)
            continue
        spec = None
        if _is_dtensor(tensor):
            if plan is not None:
                raise ValueError(
                    f"plan: {qualified} is a DTensor, which is fetched by its placements; "
                    "drop rank, world_size and plan"
                )
            piece = _dtensor_block(qualified, tensor)
        else:
            piece = None if plan is None or is_buffer else plan(name, tensor)
        if isinstance(head, Draw):
            spec = {
                "name": name if prefix is None else f"{prefix}.{name}",
                "shape": list(tensor.shape),
                "dtype": _dtype_name(qualified, dtype or tensor.dtype),
                "init": head.init,
                **head.fields,
            }
            if piece is not None:
                spec["slice"] = piece
        block = None if piece is None else _block(piece, tuple(tensor.shape))
        entries.append(_Entry(qualified, name, tensor, program, spec, block, is_buffer))
    if refusals:
        raise InitRefused(_refusal_message(refusals))
    if untouched:
        warnings.warn(
            f"the init code writes no value into buffers {', '.join(untouched)}: init_module "
            "leaves them as they are",
            stacklevel=3,
        )
    tensors = [e.spec for e in entries if e.spec is not None]
    return _Plan({"seed": seed, "tensors": tensors}, entries)


def _ruled(program, name, rules):
    """The program with the first matching rule's draw in place of what the init code did."""
    fields = rule_for(name, rules)
    if not fields:
        return program
    fields = dict(fields)
    init = fields.pop("init", None)
    if isinstance(program.head, Draw):
        head = program.head
        return Program(
            Draw(init or head.init, f"rules ({name})", {**head.fields, **fields}), program.steps
        )
    if init is None:
        raise ValueError(
            f"rules: the rule for {name} sets {sorted(fields)} but no init, and {name} is not "
            "drawn by its init code: give the rule an init"
        )
    return Program(Draw(init, f"rules ({name})", fields))


def _problem(program, is_buffer):
    """Why a program cannot be served or replayed, None when it can (or, for a buffer, when
    nothing wrote it)."""
    head = program.head
    if isinstance(head, Refused):
        return f"{head.op} {head.reason}"
    if isinstance(head, Copy) and head.source.is_meta:
        return (
            "its value was computed on the meta device while recording, so it is unknown "
            "(compute it on a real device, or let the model's init code write it)"
        )
    if isinstance(head, Draw | Fill | Copy):
        return None
    if program.steps:
        return "the init code writes only part of it"
    return None if is_buffer else "no init code writes it"


def _refusal_message(refusals):
    lines, suggested = [], []
    for qualified, name, tensor, problem in refusals:
        lines.append(f"{qualified}: {problem}")
        if name is not None:  # a parameter: a rule can replace its init
            scheme = '{"xavierUniform": {}}' if tensor.dim() >= 2 else '{"zeros": {}}'
            suggested.append(f"({name!r}, {scheme})")
    return (
        "weightinit cannot serve the init of:\n  "
        + "\n  ".join(lines)
        + "\nWrite it with torch.nn.init or Tensor.normal_/uniform_/fill_ on the whole tensor, "
        "or build the model inside weightinit.torch.recording()"
        + (
            ", or replace its init with rules=["
            + ", ".join(suggested[:3])
            + (", ...]" if len(suggested) > 3 else "]")
            if suggested
            else ""
        )
    )


def _block(piece, shape):
    """A Slice (proto3 JSON) as ranges per dim, or (start, stop) for a flat one."""
    if "flat" in piece:
        return (int(piece["flat"].get("start", 0)), int(piece["flat"].get("stop", 0)))
    if "dims" in piece:
        return [
            range(int(r.get("start", 0)), int(r.get("stop", 0))) for r in piece["dims"]["ranges"]
        ]
    shard = piece["shard"]
    ranges = [range(size) for size in shape]
    dim = int(shard.get("dim", 0))
    ranges[dim] = _chunk(ranges[dim], int(shard["count"]))[int(shard.get("index", 0))]
    return ranges


def _expected(module, seed, target, *, security=None, timeout=None, **init_kwargs):
    """{qualified name: the tensor this process should hold} for every parameter and buffer
    init_module() writes (a DTensor's local block), in new CPU tensors; the module is untouched."""
    planned = _plan(
        module,
        seed,
        init_kwargs.pop("rules", None),
        init_kwargs.pop("dtype", None),
        None,
        init_kwargs.pop("prefix", None),
        init_kwargs.pop("init", None),
        init_kwargs.pop("buffer_device", None),
    )
    if init_kwargs:
        raise TypeError(f"unexpected arguments {sorted(init_kwargs)}")
    fresh = {}
    for entry in planned.entries:
        local = _local_tensor(entry.tensor)
        fresh[entry] = torch.empty(local.shape, dtype=local.dtype)
    planned.write(_client(target, security), timeout, fresh)
    return {entry.qualified: tensor for entry, tensor in fresh.items()}


_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "_fsdp_wrapped_module",
    ),
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",
        "_checkpoint_wrapped_module",
    ),
)


def _client(target, security):
    if isinstance(target, Client):
        if security is not None:
            raise ValueError("security: give it to the weightinit.Client passed as target")
        return target
    return shared_client(target, security)


def _check_materialized(module, meta_ok):
    """ValueError naming the parameters that hold no memory yet: lazy ones (no shape either),
    and unless `meta_ok`, those on the meta device."""
    lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"parameters {', '.join(lazy)} are uninitialized (lazy modules): run a forward pass "
            "to give them their shapes first"
        )
    meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if meta and not meta_ok:
        shown = ", ".join(meta[:5]) + (f" and {len(meta) - 5} more" if len(meta) > 5 else "")
        raise ValueError(
            f"{shown} are on the meta device: call module.to_empty(device=...) first, then "
            "init_module fills the parameters in place"
        )


def _tie_declared_weights(module):
    """Ties again the weights a transformers model declares tied (to_empty unties them): calls
    tie_weights() of the outermost modules that have it and `_tied_weights_keys`."""
    tied = []
    for path, child in module.named_modules():
        if any(path.startswith(done + ".") for done in tied) or "" in tied:
            continue
        if callable(getattr(child, "tie_weights", None)) and hasattr(child, "_tied_weights_keys"):
            child.tie_weights()
            tied.append(path)


def _unwrapped_name(module, qualified):
    """`qualified` without the attribute names through which wrappers hold their module."""
    parts = qualified.split(".")
    kept, current = [], module
    for part in parts[:-1]:
        if part != _wrapped_attribute(current):
            kept.append(part)
        current = current._modules[part]
    kept.append(parts[-1])
    return ".".join(kept)


def _wrapped_attribute(module):
    for module_name, class_name, attribute in _WRAPPERS:
        imported = sys.modules.get(module_name)
        wrapper = getattr(imported, class_name, None)
        if wrapper is not None and isinstance(module, wrapper):
            return attribute
    return None


def _checked_rules(rules):
    """The rules checked as for every framework (_rules.check_rules), less what a torch parameter,
    written in place in its own shape and layout, cannot take."""
    checked = check_rules(rules)
    for index, (pattern, fields) in enumerate(checked):
        fixed = sorted(set(fields) & {"shape", "permute"})
        if fixed:
            raise ValueError(
                f"rules[{index}] ({pattern!r}): {fixed} cannot change for a torch parameter, "
                "which is written in place in its own shape and layout"
            )
    return checked


def _dtype_name(name, dtype):
    if dtype not in _DTYPES:
        raise ValueError(f"{name}: weightinit serves {sorted(map(str, _DTYPES))}, not {dtype}")
    return _DTYPES[dtype]


def _is_dtensor(tensor):
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _local_tensor(tensor):
    """The tensor this process holds: a DTensor's local tensor, a plain tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _dtensor_block(name, param):
    """The Slice (proto3 JSON) of the block of DTensor `param` this process holds, None when it
    holds the whole tensor.

    Placements apply left to right over the mesh dimensions, each Shard(d) splitting what is
    left of dim d with torch.chunk semantics (uneven and empty chunks included, nested Shards of
    one dim too); a _StridedShard (FSDP2 over tensor parallel) splits each of its split_factor
    pieces and keeps this rank's part of each. The block must be contiguous in every dim."""
    from torch.distributed.tensor import placement_types

    # FSDP2's placement for a dim that tensor parallel shards too; private, so looked up softly.
    strided = getattr(placement_types, "_StridedShard", ())

    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{name}: this process is not in the DTensor's device mesh")
    indices = [range(size) for size in param.shape]
    for mesh_dim, placement in enumerate(param.placements):
        count, index = param.device_mesh.size(mesh_dim), coordinate[mesh_dim]
        if placement.is_replicate():
            continue
        if isinstance(placement, strided):
            pieces = _chunk(indices[placement.dim], int(placement.split_factor))
            indices[placement.dim] = _concat([_chunk(p, count)[index] for p in pieces])
        elif placement.is_shard():
            indices[placement.dim] = _concat([_chunk(indices[placement.dim], count)[index]])
        else:
            raise ValueError(
                f"{name}: placement {placement!r} on mesh dim {mesh_dim} is not supported: "
                "weightinit fills Shard and Replicate placements"
            )
    scattered = [dim for dim, held in enumerate(indices) if not isinstance(held, range)]
    if scattered:
        raise ValueError(
            f"{name}: placements {param.placements} give this process indices of dim "
            f"{scattered[0]} that are not one contiguous range; redistribute the parameter first"
        )
    local = tuple(param.to_local().shape)
    if tuple(map(len, indices)) != local:
        raise ValueError(
            f"{name}: placements {param.placements} give a block of shape "
            f"{tuple(map(len, indices))}, the local tensor is {local}"
        )
    if tuple(map(len, indices)) == tuple(param.shape):
        return None
    return {"dims": {"ranges": [{"start": r.start, "stop": r.stop} for r in indices]}}


def _chunk(indices, count):
    """torch.chunk(indices, count) as count pieces, the ones past the last chunk empty."""
    size = -(-len(indices) // count)
    return [indices[i * size : (i + 1) * size] for i in range(count)]


def _concat(pieces):
    """The pieces of indices joined, as a range when they are contiguous."""
    joined = [i for piece in pieces for i in piece]
    start = joined[0] if joined else 0
    if joined == list(range(start, start + len(joined))):
        return range(start, start + len(joined))
    return joined


def _writable_view(tensor, dtype_name):
    """A numpy array sharing the tensor's memory, when the fetched bytes can go straight
    there: a CPU, contiguous tensor of the requested dtype. None otherwise."""
    if (
        tensor.device.type != "cpu"
        or not tensor.is_contiguous()
        or _DTYPES.get(tensor.dtype) != dtype_name
    ):
        return None
    data = tensor.detach()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return data.numpy()


def _as_tensor(array):
    """A fetched array as a torch tensor, sharing its memory."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
