"""Proof that every process holds the weights a request serves, by name.

    report = weightinit.torch.verify(model, 42, "local")              # on every rank alike
    report = weightinit._verify.verify_arrays(params, request, "local")   # a pytree of jax.Arrays

Each process hashes (BLAKE3) what it holds, a DTensor's local block or each device's shard of a
jax.Array, and compares it with what the request serves for that block. Under torch.distributed
the ranks then all-gather their results: every rank gets the same report, so either every rank
returns or every rank raises WeightsDiffer, and none goes on training while another stops. The
report names every tensor that differs and the ranks (and devices) that hold it wrong, with both
digests in hex: the form weightinit.digest(), `weightinit digest` and safetensors metadata use.
"""

import time
import warnings
from dataclasses import dataclass

import blake3
import numpy as np
from google.protobuf import json_format

from .request import check_seed, to_message

# How long verify() waits for torch.distributed's threads to let go of its gathered tensors.
RELEASE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Difference:
    """One tensor as one process (and device) holds it, unlike what the request serves it.

    held, expected: hex BLAKE3 of the tensor's (or block's) little-endian elements; both None
    when the process has no tensor of that name that the request would initialize.
    """

    name: str
    rank: int
    held: str | None
    expected: str | None
    device: str | None = None

    def __str__(self) -> str:
        where = f"rank {self.rank}" + (f" {self.device}" if self.device else "")
        if self.held is None:
            return f"{where}: has no such tensor"
        return f"{where}: holds {self.held}, the request serves {self.expected}"


@dataclass(frozen=True)
class Report:
    """What verify() found: every tensor checked, and each copy of one that differs.

    ranks: how many processes' holdings the report covers (the torch.distributed group's size;
    1 for a single process, and for verify_arrays(), which checks this process's devices).
    """

    seed: int
    ranks: int
    names: tuple[str, ...]
    differences: tuple[Difference, ...]

    @property
    def ok(self) -> bool:
        """True when every process holds exactly what the request serves."""
        return not self.differences

    def differing(self) -> dict[str, list[int]]:
        """{tensor name: the ranks holding it wrong}, in the order the tensors were checked."""
        differing = {}
        for difference in self.differences:
            ranks = differing.setdefault(difference.name, [])
            if difference.rank not in ranks:
                ranks.append(difference.rank)
        return differing

    def __str__(self) -> str:
        checked = f"{len(self.names)} tensors on {self.ranks} rank(s), seed {self.seed}"
        if self.ok:
            return f"weightinit verify: all {checked} hold what the request serves"
        differing = self.differing()
        lines = [f"weightinit verify: {len(differing)} of {checked} differ:"]
        for name, ranks in differing.items():
            lines.append(f"  {name} on rank(s) {', '.join(map(str, ranks))}")
            lines.extend(f"    {d}" for d in self.differences if d.name == name)
        return "\n".join(lines)


class WeightsDiffer(Exception):
    """Some process holds weights that the request does not serve; `report` names them."""

    def __init__(self, report: Report):
        super().__init__(str(report))
        self.report = report


def verify(model, seed: int, target, *, group=None, check: bool = True, **init_kwargs) -> Report:
    """Checks that `model` holds exactly what weightinit.torch.init_module(model, seed, target,
    **init_kwargs) writes into it, in this process and, under torch.distributed, on every rank.

    Call it on every rank of `group` (default: the whole world) with the same arguments, as
    init_module was called. It hashes each parameter this process holds (a DTensor's local
    block) and buffer, computes what init_module writes there into new CPU tensors (this
    process's share of the model once more in host memory, each tensor freed once hashed) and
    compares the two; under an initialized torch.distributed, the ranks all-gather their
    digests (a few hundred bytes per tensor) so that every rank builds the same report.

    init_kwargs: init_module's keyword arguments (rules, prefix, init, buffer_device, dtype,
        timeout, security). check: raise WeightsDiffer when anything differs (default); False returns
        the report either way.

    Returns the Report. Raises WeightsDiffer (on every rank alike) naming every tensor that
    differs and where; ValueError before any work for a model on the meta device, and on every
    rank when ranks passed different seeds.
    """
    from . import torch as wt

    seed = check_seed(seed)
    held = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    meta = [name for name, tensor in held.items() if tensor.is_meta]
    if meta:
        raise ValueError(
            f"model: {', '.join(meta[:5])} are on the meta device: verify checks weights a "
            "process holds; materialize and initialize the model first"
        )
    expected = wt._expected(model, seed, target, **init_kwargs)
    order = list(expected)
    digests = {}
    while expected:  # each expected tensor freed once hashed
        name, tensor = expected.popitem()
        digests[name] = [(None, wt.tensor_digest(held[name]), wt.tensor_digest(tensor))]
    gathered = _gather((seed, digests), group)
    seeds = {rank: theirs for rank, (theirs, _) in enumerate(gathered)}
    if len(set(seeds.values())) > 1:
        raise ValueError(f"seed: the ranks passed different seeds {seeds}; pass the same seed")
    return _report(seed, list(enumerate(ranked for _, ranked in gathered)), order, check)


def _gather(mine, group):
    """What every rank of `group` passed, by rank; [mine] outside torch.distributed.

    torch's all_gather_object, written out to control who lets go of its tensors last. A gloo
    worker thread drops its hold on a collective's tensors just after the caller's wait()
    returns; if that is the last hold but Python's, it must take the GIL, and if the interpreter
    is exiting by then (verify() is often a script's last call) Python ends the thread inside
    C++ and the process aborts ("terminate called without an active exception", about one
    two-rank run in three on 2 cores). So each tensor has a second hold, a view (a view holds
    its base), until the collectives' threads have let go: theirs is then never the last.
    """
    import pickle

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    # The device torch's object collectives use for this group (cuda for NCCL).
    device = dist.distributed_c10d._get_object_coll_device(group)
    ranks = dist.get_world_size(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(mine)), dtype=torch.uint8)
    with torch.inference_mode(False):  # views made in inference mode do not hold their base
        size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
        sizes = [torch.zeros_like(size) for _ in range(ranks)]
        holds = [tensor.view(-1) for tensor in [size, *sizes]]
        dist.all_gather(sizes, size, group=group)
        padded = torch.zeros(max(int(n) for n in sizes), dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload.to(device)
        blocks = [torch.empty_like(padded) for _ in range(ranks)]
        holds += [tensor.view(-1) for tensor in [padded, *blocks]]
        dist.all_gather(blocks, padded, group=group)
    gathered = [
        pickle.loads(block[: int(n)].cpu().numpy().tobytes())
        for block, n in zip(blocks, sizes, strict=True)
    ]
    # Each held by its Python object and its view, 2, once the collectives let go.
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while any(view._base._use_count() > 2 for view in holds):
        if time.monotonic() > deadline:
            warnings.warn(
                f"torch.distributed still holds verify()'s tensors after {RELEASE_TIMEOUT} s; "
                "if this process exits now, it may abort",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        time.sleep(0.001)
    return gathered


def _report(seed, by_rank, order, check):
    """The Report of (rank, {name: [(device, held, expected) digests of each copy]}) pairs,
    raised as WeightsDiffer when `check` and anything differs. A name that some ranks have and
    others lack is a difference on the latter."""
    names = list(dict.fromkeys([*order, *(name for _, ranked in by_rank for name in ranked)]))
    differences = []
    for name in names:
        for rank, ranked in by_rank:
            if name not in ranked:
                differences.append(Difference(name, rank, None, None))
                continue
            differences += [
                Difference(name, rank, held, expected, device)
                for device, held, expected in ranked[name]
                if held != expected
            ]
    report = Report(seed, len(by_rank), tuple(names), tuple(differences))
    if check and not report.ok:
        raise WeightsDiffer(report)
    return report


def verify_arrays(
    arrays, request, target, *, check: bool = True, timeout=None, security=None
) -> Report:
    """The JAX twin of verify(): checks that every shard of `arrays` that this process's
    devices hold is exactly the block the request serves there.

    arrays: a pytree of jax.Arrays (Flax's boxed leaves included) whose leaves, in tree order,
        were made from the tensors of `request`, as weightinit.jax.make_arrays(seed, tensors,
        ...) makes them from {"seed": seed, "tensors": [spec for spec, _ in tensors]}.
    request: that GenerateRequest or its proto3 JSON dict (no slices: the arrays are the
        tensors' whole views, sharded).
    target, timeout, security: where the expected blocks come from, as for weightinit.fetch().
    check: raise WeightsDiffer when anything differs (default); False returns the report.

    Every device's copy of a block is hashed, so a replica that differs on one device is named
    with that device; the expected blocks are fetched once each. The report covers this
    process (its rank is jax.process_index()); processes do not exchange results.
    Raises ValueError before any fetch when the leaves do not match the request's tensors.
    """
    import jax

    from . import _blocks, _rules
    from .jax import _block

    message = to_message(request)
    whole = json_format.MessageToDict(message)
    leaves = jax.tree_util.tree_leaves(arrays)
    specs = [_spec(spec, whole) for spec in whole.get("tensors", [])]
    if len(leaves) != len(specs):
        raise ValueError(
            f"arrays: {len(leaves)} leaves, but the request has {len(specs)} tensors; pass the "
            "request the arrays were made from"
        )
    shards = []
    for leaf, spec in zip(leaves, specs):
        shape = _rules.view_shape(spec)
        dtype = _rules.numpy_dtype(spec["dtype"])
        if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) != dtype:
            raise ValueError(
                f"arrays: the leaf for {spec['name']!r} is {leaf.dtype}{list(leaf.shape)}, the "
                f"request makes {dtype}{list(shape)}"
            )
        shards.append([(_block(s.index, shape), s) for s in leaf.addressable_shards])

    fetched = _blocks.fetch_blocks(
        message.seed,
        [(spec, [block for block, _ in held]) for spec, held in zip(specs, shards)],
        target,
        timeout=timeout,
        security=security,
    )
    digests = {}
    for spec, held, blocks in zip(specs, shards, fetched):
        expected = {block: _hash(array) for block, array in blocks.items()}
        digests[spec["name"]] = [
            (str(shard.device), _hash(np.asarray(shard.data)), expected[block])
            for block, shard in held
        ]
    return _report(message.seed, [(jax.process_index(), digests)], list(digests), check)


def _spec(spec, request):
    """A tensor's spec with the request-wide dtype and layout it inherits written into it."""
    if "slice" in spec:
        raise ValueError(f"request: {spec['name']!r} has a slice; verify takes whole tensors")
    spec = dict(spec)
    spec.setdefault("dtype", request.get("dtype", "DTYPE_FLOAT32"))
    if "layout" in request:
        spec.setdefault("layout", request["layout"])
    return spec


def _hash(array):
    """Hex BLAKE3 of an array's elements, row-major and little-endian as the server hashes them."""
    data = np.ascontiguousarray(array)
    return blake3.blake3(data.reshape(-1).view(np.uint8)).hexdigest()
