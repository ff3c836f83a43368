"""Initialize torch modules from a weightinit server.

    import weightinit.torch
    weightinit.torch.init_module(model, seed=42, target="127.0.0.1:50051")

Every parameter becomes one tensor of the request, named by its qualified parameter name
(`0.weight`, `encoder.fc1.bias`, ...), so the same model and seed give the same bytes in every
process. Parameters get PyTorch's defaults by the layer that owns them unless a rule matches:
- Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d: weight torchDefault; bias torchDefaultBias with
  fanIn = weight.shape[1] * prod(kernel), as reset_parameters() computes it;
- Embedding: weight normal(0, 1) (a padding_idx row is not zeroed: it keeps the served values);
- LayerNorm, GroupNorm, RMSNorm, BatchNorm*, SyncBatchNorm, InstanceNorm*: weight ones, bias zeros.
Any other parameter needs a rule; init_module() names those that have none.
"""

import fnmatch
import math
import re

import blake3
import numpy as np
import torch
from torch import nn

from weightinit.v1 import weightinit_pb2 as pb

from .client import fetch
from .recipes import resolve

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
_NORMS = tuple(
    getattr(nn, name)
    for name in (
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
    )
    if hasattr(nn, name)
)

# Keys that make a rule's value an Init (a scheme) rather than TensorSpec overrides, and the
# proto3 JSON name of every TensorSpec field under either of its spellings.
_INIT_KEYS = {key for f in pb.Init.DESCRIPTOR.fields for key in (f.name, f.json_name)}
_SPEC_KEYS = {
    key: f.json_name for f in pb.TensorSpec.DESCRIPTOR.fields for key in (f.name, f.json_name)
}


def init_module(
    module,
    seed,
    target,
    rules=None,
    rank=None,
    world_size=None,
    dtype=None,
    plan=None,
    timeout=None,
    *,
    security=None,
    recipe="torch",
):
    """Initializes every parameter of `module` from the server at `target`.

    seed: the experiment's seed (u64).
    rules: see build_request().
    dtype: a torch dtype to generate every tensor in (default: each parameter's own dtype);
        the values are then cast into the parameter.
    timeout: seconds for the Generate call, None for no deadline.
    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.
    recipe: see build_request().

    Without rank, world_size or plan: copies the values into the parameters in place (straight
    into CPU parameters' memory when the dtypes agree) and returns {name: parameter}.

    Sharded, with rank and world_size and/or plan: leaves the parameters untouched and returns
    {name: local shard}, plain tensors (requires_grad False). The default plan, from rank and
    world_size, shards every parameter of rank >= 1 along dim 0 with torch.chunk semantics
    ({"shard": {"dim": 0, "index": rank, "count": world_size}}) and sends 0-d ones whole.
    plan(name, parameter) returns a Slice in proto3 JSON form ({"shard": ...}, {"dims": ...} or
    {"flat": ...}), or None for the whole tensor.
    """
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size go together")
    if world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if plan is None:
            plan = shard_plan(rank, world_size)
    request = build_request(module, seed, rules, dtype, plan, recipe=recipe)
    params = dict(module.named_parameters())
    specs = dict(zip(params, request["tensors"]))

    if plan is not None:
        fetched = fetch(request, target, timeout=timeout, security=security)
        return {name: _as_tensor(fetched[spec["name"]]) for name, spec in specs.items()}

    with torch.no_grad():
        out = {}
        for name, spec in specs.items():
            view = _writable_view(params[name], spec["dtype"])
            if view is not None:
                out[spec["name"]] = view
        fetched = fetch(request, target, out=out, timeout=timeout, security=security)
        for name, spec in specs.items():
            if spec["name"] not in out:
                params[name].copy_(_as_tensor(fetched[spec["name"]]))
    return params


def shard_plan(rank, world_size):
    """The default sharding plan: dim 0 of every tensor of rank >= 1, torch.chunk semantics."""

    def plan(name, param):
        if param.dim() == 0:
            return None
        return {"shard": {"dim": 0, "index": rank, "count": world_size}}

    return plan


def build_request(module, seed, rules=None, dtype=None, plan=None, *, recipe="torch"):
    """Returns the GenerateRequest, in proto3 JSON form, that initializes `module`.

    Its tensors follow module.named_parameters(), one per parameter.
    rules: a list of (pattern, value); the first pattern that matches a parameter's qualified
        name decides it. A str pattern is a glob matching the whole name ("*.bias"); a compiled
        re.Pattern is searched in the name (re.compile(r"attn\\.")). A value whose keys are
        scheme names is the Init ({"xavierUniform": {}}); any other dict overrides fields of the
        tensor's spec ({"init": {"normal": {"std": 0.02}}, "fanIn": "64"}), keeping the default
        init when it sets none.
    dtype, plan: see init_module().
    recipe: "torch" (PyTorch's layer defaults), "hf" or "torchvision": the model family's own
        init (weightinit.recipes); rules still override it, and parameters it leaves alone get
        their layer defaults.
    """
    spec_for = resolve(recipe, module)
    owners = {}
    for owner in module.modules():
        for local, param in owner.named_parameters(recurse=False):
            owners.setdefault(id(param), (owner, local))

    tensors, missing = [], []
    for name, param in module.named_parameters():
        owner, local = owners[id(param)]
        spec = {
            "name": name,
            "shape": list(param.shape),
            "dtype": _dtype_name(name, dtype or param.dtype),
        }
        spec.update(spec_for(owner, local, name) or _default_spec(owner, local))
        piece = None if plan is None else plan(name, param)
        if piece is not None:
            spec["slice"] = piece
        spec.update(_rule_for(name, rules or ()))
        if "init" not in spec:
            missing.append(f"{name} ({type(owner).__name__})")
        tensors.append(spec)
    if missing:
        raise ValueError(
            "no initializer for parameters " + ", ".join(missing) + ": PyTorch has no default "
            'that weightinit knows for their layers; add rules, e.g. rules=[("*.in_proj_weight", '
            '{"xavierUniform": {}})]'
        )
    return {"seed": seed, "tensors": tensors}


def tensor_digest(tensor):
    """Hex BLAKE3 of the tensor's elements (row-major, little-endian), as the Digest RPC
    computes it for the same request: compare with weightinit.digest()."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return blake3.blake3(data.numpy().reshape(-1).view(np.uint8)).hexdigest()


def _dtype_name(name, dtype):
    if dtype not in _DTYPES:
        raise ValueError(f"{name}: weightinit serves {sorted(map(str, _DTYPES))}, not {dtype}")
    return _DTYPES[dtype]


def _default_spec(owner, local):
    """PyTorch's default init of parameter `local` of layer `owner`, as TensorSpec fields."""
    if isinstance(owner, _AFFINE):
        if local == "weight":
            return {"init": {"torchDefault": {}}}
        if local == "bias":
            weight = owner.weight
            return {
                "init": {"torchDefaultBias": {}},
                "fanIn": str(weight.shape[1] * math.prod(weight.shape[2:])),
            }
    if isinstance(owner, nn.Embedding) and local == "weight":
        return {"init": {"normal": {}}}
    if isinstance(owner, _NORMS):
        if local == "weight":
            return {"init": {"ones": {}}}
        if local == "bias":
            return {"init": {"zeros": {}}}
    return {}


def _rule_for(name, rules):
    """The TensorSpec overrides of the first rule matching `name`, {} if none does."""
    for pattern, value in rules:
        if isinstance(pattern, re.Pattern):
            matched = pattern.search(name) is not None
        else:
            matched = fnmatch.fnmatchcase(name, pattern)
        if matched:
            if value and set(value) <= _INIT_KEYS:
                return {"init": value}
            return {_SPEC_KEYS.get(key, key): field for key, field in value.items()}
    return {}


def _writable_view(param, dtype_name):
    """A numpy array sharing the parameter's memory, when the fetched bytes can go straight
    there: a CPU, contiguous parameter of the requested dtype. None otherwise."""
    if (
        param.device.type != "cpu"
        or not param.is_contiguous()
        or _DTYPES.get(param.dtype) != dtype_name
    ):
        return None
    data = param.detach()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return data.numpy()


def _as_tensor(array):
    """A fetched array as a torch tensor, sharing its memory."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
