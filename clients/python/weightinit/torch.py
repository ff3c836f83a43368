"""Initialize torch modules from a weightinit server: plain, wrapped, tied, sharded as DTensors.

    import weightinit.torch
    weightinit.torch.init_module(model, seed=42, target="127.0.0.1:50051")

Every parameter becomes one tensor of the request, named by its qualified parameter name
(`0.weight`, `encoder.fc1.bias`, ...) without the attribute names of wrappers (torch.compile's
`_orig_mod`, DDP's `module`, FSDP's and checkpoint wrappers'), so the same model and seed give the
same bytes in every process, wrapped or not. `prefix=` puts a model's names in a namespace of
their own.

Parameters get PyTorch's own defaults by the layer that owns them (see `_default_spec`) unless a
rule matches; any other parameter needs a rule, and init_module() names those that have none.

DTensor parameters (FSDP2's fully_shard, tensor parallel's parallelize_module, distribute_tensor)
are filled in place from their placements: each process fetches only the block it holds, once.
"""

import math
import re
import sys
import warnings

import blake3
import numpy as np
import torch
from torch import nn

from ._rules import INIT_KEYS, SPEC_KEYS, rule_for
from .client import Client, shared_client
from .request import check_seed

# TensorSpec fields a rule may set: not those that say which tensor it is (a permuted view has
# the same byte length as the parameter and would be written in place without an error).
_RULE_KEYS = {
    key for key, field in SPEC_KEYS.items() if field not in ("name", "shape", "slice", "permute")
}

_DTYPES = {
    torch.float32: "DTYPE_FLOAT32",
    torch.float64: "DTYPE_FLOAT64",
    torch.float16: "DTYPE_FLOAT16",
    torch.bfloat16: "DTYPE_BFLOAT16",
}

_AFFINE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Layers whose running statistics are buffers that reset_running_stats() rebuilds.
_RUNNING_STATS = tuple(
    getattr(nn, name)
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
    )
)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, *_RUNNING_STATS)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

# Wrappers that hold the wrapped module as one attribute: (module, class, attribute). The class
# is looked up only when its module is already imported: without it, no instance can exist.
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

# Keys that make a rule's value an Init (a scheme) rather than TensorSpec overrides, and the
# proto3 JSON name of every TensorSpec field a rule may set under either of its spellings. The
# name and shape are the parameter's; what is fetched of it (slice) is the plan's or the
# DTensor's; a permuted view would not have the parameter's shape.


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
    recipe: str = "torch",
    prefix: str | None = None,
):
    """Initializes every parameter of `module` from the server at `target`.

    seed: the experiment's seed, in 0..2**64-1.
    target: "host:port", or a weightinit.Client (then `security` is the client's).
    rules, recipe, prefix: see build_request().
    dtype: a torch dtype to generate every tensor in (default: each parameter's own dtype);
        the values are then cast into the parameter.
    timeout: seconds for the Generate call; None for the client's default deadline.
    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.

    The module must be materialized: parameters on the meta device are an error (call
    `module.to_empty(device=...)` first), except when sharding with a plan, which reads shapes
    only. Before building the request, models that declare tied
    weights the way transformers does (`tie_weights()`, `_tied_weights_keys`) are tied again, as
    `to_empty` unties them; a tied parameter is fetched once.

    Without rank, world_size or plan: writes the values into the parameters in place (straight
    into CPU parameters' memory when the dtypes agree) and returns {name: parameter}. A DTensor
    parameter gets the block its placements give this process, written into its local tensor;
    its full_tensor() is then the single-process init. Embedding rows at padding_idx are zeroed
    and norm layers' running statistics reset, as PyTorch's reset_parameters() does; a
    UserWarning names every other buffer, which init_module leaves as it is.

    Sharded, with rank and world_size and/or plan (plain tensors only): leaves the module
    untouched and returns {name: local shard} (names as module.named_parameters() gives them),
    plain tensors (requires_grad False). The default
    plan, from rank and world_size, shards every parameter of rank >= 1 along dim 0 with
    torch.chunk semantics ({"shard": {"dim": 0, "index": rank, "count": world_size}}) and sends
    0-d ones whole. plan(name, parameter), `name` as the request names the tensor (before the
    prefix), returns a Slice in proto3 JSON form ({"shard": ...}, {"dims": ...} or {"flat":
    ...}), or None for the whole tensor.
    """
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size go together")
    if world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if plan is None:
            plan = shard_plan(rank, world_size)
    _check_materialized(module, meta_ok=plan is not None)
    if plan is None:
        _tie_declared_weights(module)
    request = build_request(module, seed, rules, dtype, plan, recipe=recipe, prefix=prefix)
    params = dict(module.named_parameters())
    specs = dict(zip(params, request["tensors"]))
    padding = _padding_rows(module)
    client = _client(target, security)
    if not params:
        return {}

    if plan is not None:
        fetched = client.fetch(request, timeout=timeout)
        shards = {}
        for name, spec in specs.items():
            shard = _as_tensor(fetched[spec["name"]])
            _zero_rows(padding.get(id(params[name]), ()), params[name], shard, spec.get("slice"))
            shards[name] = shard
        return shards

    with torch.no_grad():
        locals_ = {name: _local_tensor(param) for name, param in params.items()}
        out = {}
        for name, spec in specs.items():
            view = _writable_view(locals_[name], spec["dtype"])
            if view is not None:
                out[spec["name"]] = view
        fetched = client.fetch(request, out=out, timeout=timeout)
        for name, spec in specs.items():
            if spec["name"] not in out:
                locals_[name].copy_(_as_tensor(fetched[spec["name"]]))
            rows = padding.get(id(params[name]), ())
            _zero_rows(rows, params[name], locals_[name], spec.get("slice"))
        _rebuild_buffers(module)
    return params


def shard_plan(rank: int, world_size: int):
    """The default sharding plan: dim 0 of every tensor of rank >= 1, torch.chunk semantics."""

    def plan(name, param):
        if param.dim() == 0:
            return None
        return {"shard": {"dim": 0, "index": rank, "count": world_size}}

    return plan


def build_request(
    module: nn.Module,
    seed: int,
    rules=None,
    dtype: torch.dtype | None = None,
    plan=None,
    *,
    recipe: str = "torch",
    prefix: str | None = None,
) -> dict:
    """Returns the GenerateRequest, in proto3 JSON form, that initializes `module`.

    Its tensors follow module.named_parameters(), one per parameter (a tied one once), named by
    the qualified name without wrapper attributes (`_orig_mod.`, `module.`, ...).
    rules: a list of (pattern, value) matched against those names (before `prefix`); the first
        pattern that matches decides. A str pattern is a glob matching the whole name
        ("*.bias"); a compiled re.Pattern is searched in the name (re.compile(r"attn\\.")).
        A value whose keys are scheme names is the Init ({"xavierUniform": {}}); a value whose
        keys are TensorSpec fields overrides them ({"init": {"normal": {"std": 0.02}}, "fanIn":
        "64"}), keeping the default init when it sets none. Mixing the two is a ValueError.
    recipe: "torch" for PyTorch's layer defaults; another name asks weightinit.recipes for the
        init of a model family. Precedence: rules, then the recipe, then PyTorch's defaults.
    prefix: prepended with a dot to every tensor name, so that two models with the same
        parameter names (an actor and a critic) get different weights.
    dtype, plan: see init_module(). A DTensor parameter's slice is the block of it this process
        holds, from its placements; plan does not apply to them.
    """
    seed = check_seed(seed)
    rules = _checked_rules(rules)
    if prefix is not None and (not isinstance(prefix, str) or not prefix or prefix[-1] == "."):
        raise ValueError(f"prefix: must be a non-empty str not ending with '.', got {prefix!r}")
    spec_for = None
    if recipe != "torch":
        from .recipes import resolve

        spec_for = resolve(recipe, module)

    modules = dict(module.named_modules(remove_duplicate=False))
    tensors, missing, seen = [], {}, {}
    for qualified, param in module.named_parameters():
        name = _unwrapped_name(module, qualified)
        if name in seen:
            raise ValueError(f"parameters {seen[name]!r} and {qualified!r} both unwrap to {name!r}")
        seen[name] = qualified
        path, _, local = qualified.rpartition(".")
        owner = modules[path]
        spec = {
            "name": name if prefix is None else f"{prefix}.{name}",
            "shape": list(param.shape),
            "dtype": _dtype_name(name, dtype or param.dtype),
        }
        found = None if spec_for is None else spec_for(owner, local, name)
        spec.update(found if found is not None else _layer_default(modules, qualified))
        if _is_dtensor(param):
            if plan is not None:
                raise ValueError(
                    f"plan: {qualified} is a DTensor, which is fetched by its placements; "
                    "drop rank, world_size and plan"
                )
            piece = _dtensor_block(qualified, param)
        else:
            piece = None if plan is None else plan(name, param)
        if piece is not None:
            spec["slice"] = piece
        spec.update(rule_for(name, rules))
        if "init" not in spec:
            missing.setdefault((type(owner).__name__, local, param.dim()), []).append(name)
        tensors.append(spec)
    if missing:
        raise ValueError(_missing_message(missing))
    return {"seed": seed, "tensors": tensors}


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex BLAKE3 of the tensor's elements (row-major, little-endian), as the Digest RPC
    computes it for the same request: compare with weightinit.digest(). For a DTensor, the
    digest of the block this process holds, which build_request() asks for."""
    data = _local_tensor(tensor).detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return blake3.blake3(data.numpy().reshape(-1).view(np.uint8)).hexdigest()


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


def _layer_default(modules, qualified):
    """PyTorch's default for a parameter, asking the outermost layer first: an outer layer's
    reset (nn.Transformer's, MultiheadAttention's) runs after, and wins over, its children's."""
    parts = qualified.split(".")
    for depth in range(len(parts)):
        owner = modules[".".join(parts[:depth])]
        found = _default_spec(owner, ".".join(parts[depth:]))
        if found is not None:
            return found
    return {}


def _default_spec(owner, local):
    """PyTorch's default init of parameter `local` of layer `owner` (a name relative to it, as
    "out_proj.bias" of a MultiheadAttention), as TensorSpec fields; None when the layer does
    not set it (its own layer's default, if any, then applies)."""
    param = owner.get_parameter(local)
    if isinstance(owner, nn.Transformer):
        return {"init": {"xavierUniform": {}}} if param.dim() > 1 else None
    if isinstance(owner, nn.MultiheadAttention):
        if local in _MHA_PROJECTIONS:
            return {"init": {"xavierUniform": {}}}
        if local == "in_proj_bias" or (local == "out_proj.bias" and owner.in_proj_bias is not None):
            return {"init": {"zeros": {}}}
        if local in ("bias_k", "bias_v"):
            return {"init": {"xavierNormal": {}}}
        return None
    if "." in local:
        return None
    if isinstance(owner, _AFFINE):
        if local == "weight":
            return {"init": {"torchDefault": {}}}
        if local == "bias":
            weight = owner.weight
            return {
                "init": {"torchDefaultBias": {}},
                "fanIn": str(weight.shape[1] * math.prod(weight.shape[2:])),
            }
    if isinstance(owner, (nn.RNNBase, nn.RNNCellBase)):
        bound = 1.0 / math.sqrt(owner.hidden_size) if owner.hidden_size > 0 else 0.0
        return {"init": {"uniform": {"low": -bound, "high": bound}}}
    if isinstance(owner, nn.Bilinear):
        bound = 1 / math.sqrt(owner.weight.size(1))
        return {"init": {"uniform": {"low": -bound, "high": bound}}}
    if isinstance(owner, nn.PReLU):
        return {"init": {"constant": {"value": float(owner.init)}}}
    if isinstance(owner, _EMBEDDINGS) and local == "weight":
        return {"init": {"normal": {}}}
    if isinstance(owner, _NORMS):
        if local == "weight":
            return {"init": {"ones": {}}}
        if local == "bias":
            return {"init": {"zeros": {}}}
    return None


def _missing_message(missing):
    """The error for parameters without an init: each layer type and parameter, and a rule."""
    listed, suggested = [], []
    for (layer, local, dim), names in missing.items():
        listed.append(f"{', '.join(names)} ({layer}.{local})")
        pattern = names[0] if len(names) == 1 and names[0] == local else f"*.{local}"
        scheme = '{"xavierUniform": {}}' if dim >= 2 else '{"zeros": {}}'
        suggested.append(f"({pattern!r}, {scheme})")
    return (
        "no initializer for parameters "
        + "; ".join(listed)
        + ": PyTorch has no default for them that weightinit knows; add rules, e.g. rules=["
        + ", ".join(suggested)
        + "]"
    )


def _checked_rules(rules):
    """The rules as a list of (pattern, value); ValueError naming the first that is unusable."""
    checked = []
    for index, rule in enumerate(rules or ()):
        if not isinstance(rule, tuple | list):
            raise TypeError(f"rules[{index}]: must be a (pattern, value) pair, got {rule!r}")
        if len(rule) != 2:
            raise ValueError(f"rules[{index}]: must be a (pattern, value) pair, got {rule!r}")
        pattern, value = rule
        where = f"rules[{index}] ({pattern!r})"
        if not isinstance(pattern, str | re.Pattern):
            raise TypeError(f"{where}: the pattern is a glob str or a re.Pattern")
        if not isinstance(value, dict):
            raise TypeError(f"{where}: the value is a dict, not {type(value).__name__}")
        if not value:
            raise ValueError(f"{where}: the value is empty")
        schemes = sorted(set(value) & INIT_KEYS)
        fields = sorted(set(value) - INIT_KEYS)
        if schemes and fields:
            raise ValueError(
                f"{where}: mixes scheme keys {schemes} with TensorSpec keys {fields}; give the "
                f'scheme alone, or put it under "init": {{"init": {{{schemes[0]!r}: ...}}, ...}}'
            )
        unknown = [key for key in fields if key not in _RULE_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: {unknown} are neither schemes nor TensorSpec fields a rule may set "
                f"({sorted({SPEC_KEYS[k] for k in _RULE_KEYS})})"
            )
        checked.append((pattern, value))
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


def _padding_rows(module):
    """{id(weight): padding_idx rows} of the module's Embeddings and EmbeddingBags."""
    rows = {}
    for layer in module.modules():
        if isinstance(layer, _EMBEDDINGS) and layer.padding_idx is not None:
            rows.setdefault(id(layer.weight), set()).add(layer.padding_idx)
    return rows


def _zero_rows(rows, param, local, piece):
    """Zeroes the `rows` of `param` that `local` holds, `local` being the block of it that the
    Slice `piece` (proto3 JSON, None for the whole tensor) selects."""
    for row in rows:
        if piece is None:
            local[row] = 0
        elif "flat" in piece:
            width = math.prod(param.shape[1:])
            start = int(piece["flat"].get("start", 0))
            stop = int(piece["flat"].get("stop", 0))
            low, high = max(start, row * width), min(stop, (row + 1) * width)
            if low < high:
                local[low - start : high - start] = 0
        else:
            first = _slice_ranges(piece, param.shape)[0]
            if first.start <= row < first.stop:
                local[row - first.start] = 0


def _slice_ranges(piece, shape):
    """The index range of every dim that a dims or shard Slice (proto3 JSON) selects."""
    if "dims" in piece:
        return [
            range(int(r.get("start", 0)), int(r.get("stop", 0))) for r in piece["dims"]["ranges"]
        ]
    shard = piece["shard"]
    ranges = [range(size) for size in shape]
    dim = int(shard.get("dim", 0))
    ranges[dim] = _chunk(ranges[dim], int(shard["count"]))[int(shard.get("index", 0))]
    return ranges


def _rebuild_buffers(module):
    """Resets norm layers' running statistics, as their reset_parameters() does; warns, by
    name, about every other buffer, which may hold garbage after to_empty."""
    others = []
    for path, layer in module.named_modules():
        if isinstance(layer, _RUNNING_STATS):
            layer.reset_running_stats()
            continue
        for local, buffer in layer.named_buffers(recurse=False):
            if buffer is not None:
                others.append(f"{path}.{local}" if path else local)
    if others:
        warnings.warn(
            f"init_module leaves buffers {', '.join(others)} as they are: if the module was "
            "materialized with to_empty, rebuild them (for instance by re-running the code that "
            "computed them in __init__)",
            stacklevel=3,
        )


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
