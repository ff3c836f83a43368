"""Global, sharded jax.Arrays from a weightinit server.

    import weightinit.jax
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    w = weightinit.jax.make_array(
        "fc.kernel", (1024, 512), {"glorotUniform": {}}, NamedSharding(mesh, P(None, "model")),
        seed=42, target="127.0.0.1:50051", layout="keras",
    )

Each process fetches only the blocks its own devices hold, and each distinct block once: the
copies of a replicated block are fetched once and placed on every device that holds them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from . import _blocks, _rules
from .request import check_seed
from .security import Security


def make_array(
    name: str,
    shape: Sequence[int],
    init: Mapping[str, Any],
    sharding: jax.sharding.Sharding | jax.sharding.PartitionSpec | None,
    *,
    seed: int,
    target: str,
    dtype: DTypeLike | None = None,
    layout: str | None = None,
    permute: Sequence[int] | None = None,
    fan_in: int | None = None,
    fan_out: int | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> jax.Array:
    """Returns the tensor `name` as a global jax.Array laid out by `sharding`.

    name: the tensor's name; with the seed it keys the tensor's values.
    shape: the tensor's shape, from which (with the layout) its fans come.
    init: the scheme in proto3 JSON form, e.g. {"heNormal": {}} or {"normal": {"std": 0.02}}.
    sharding: any jax.sharding.Sharding of the array (NamedSharding on any mesh, replicated or
        partially specified, SingleDeviceSharding, ...); a NamedSharding on an AbstractMesh or a
        PartitionSpec takes the mesh of `with jax.set_mesh(mesh)`. None: an uncommitted array
        on the default device.
    seed: the experiment's seed (u64). target: the server, "host:port".
    dtype: float32 (default), bfloat16, float16 or float64 (needs jax_enable_x64).
    layout: "torch" ([out, in, *kernel]), "keras" ([*kernel, in, out]) or None for the
        server's default (torch); only the fans depend on it.
    permute: the array is numpy.transpose(tensor, permute), of shape [shape[p] for p in permute]:
        a torch weight [out, in] as a [in, out] kernel is shape (out, in), permute (1, 0).
    fan_in, fan_out: replace the fans computed from shape and layout (a bias's fan_in).
    timeout: seconds per Generate call. security: a weightinit.Security, None for plaintext.

    Raises ValueError for bad arguments before anything is fetched.
    """
    fields = _rules.as_spec(init, "init")
    if set(fields) != {"init"}:
        raise ValueError(f"init: must be a scheme, e.g. {{'heNormal': {{}}}}, got {init!r}")
    spec = {
        "name": name,
        "shape": _check_shape(shape),
        **fields,
        "dtype": _dtype_name(dtype or jnp.float32, "dtype"),
    }
    if layout is not None:
        spec["layout"] = _rules.layout_name(layout)
    if permute is not None:
        spec["permute"] = _check_permute(permute, len(spec["shape"]))
    for key, fan in (("fanIn", fan_in), ("fanOut", fan_out)):
        if fan is not None:
            if isinstance(fan, bool) or not isinstance(fan, int) or fan < 0:
                raise ValueError(f"{key}: must be an int >= 0, got {fan!r}")
            spec[key] = str(fan)
    return make_arrays(seed, [(spec, sharding)], target, timeout=timeout, security=security)[0]


def make_arrays(
    seed: int,
    tensors: Sequence[tuple[Mapping[str, Any], jax.sharding.Sharding | None]],
    target: str,
    *,
    timeout: float | None = None,
    security: Security | None = None,
) -> list[jax.Array]:
    """Returns one jax.Array per (spec, sharding) of `tensors`, fetched together: the distinct
    blocks of all tensors in as few Generate calls as possible.

    spec: a TensorSpec in proto3 JSON form with name, shape, init and dtype set (a DType name),
        and no slice; the array is its view (the shape, permuted).
    sharding: as make_array's.
    """
    check_seed(seed)
    planned = []
    for index, (spec, sharding) in enumerate(tensors):
        if "dtype" not in spec or "slice" in spec:
            raise ValueError(f"tensors[{index}]: {spec.get('name')!r} needs a dtype and no slice")
        spec = _rules.as_spec(spec, f"tensors[{index}] ({spec.get('name')!r})")
        shape = _rules.view_shape(spec)
        if sharding is None:
            blocks = [tuple((0, n) for n in shape)]
        else:
            sharding = concrete_sharding(f"sharding of {spec['name']!r}", sharding, shape)
            indices = sharding.addressable_devices_indices_map(shape)
            blocks = [_block(index, shape) for index in indices.values()]
        planned.append((spec, sharding, shape, blocks))

    fetched = _blocks.fetch_blocks(
        seed,
        [(spec, blocks) for spec, _, _, blocks in planned],
        target,
        timeout=timeout,
        security=security,
    )
    arrays = []
    for (spec, sharding, shape, blocks), pieces in zip(planned, fetched):
        if sharding is None:
            # Uncommitted, as jax.numpy and Flax's own init make them: jit may move it.
            arrays.append(jax.device_put(pieces[blocks[0]]))
            continue
        arrays.append(
            jax.make_array_from_callback(
                shape,
                sharding,
                lambda index, shape=shape, pieces=pieces: pieces[_block(index, shape)],
                dtype=_rules.numpy_dtype(spec["dtype"]),
            )
        )
    return arrays


def concrete_sharding(
    what: str,
    sharding: jax.sharding.Sharding | jax.sharding.PartitionSpec,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh | None = None,
    *,
    traced: bool = False,
) -> jax.sharding.Sharding:
    """`sharding` checked against `shape`, its mesh concrete: a PartitionSpec or a NamedSharding
    on an AbstractMesh takes `mesh`, else the mesh of `with jax.set_mesh(mesh)`. When `traced`
    (inside jax.jit, where only the abstract mesh is known) a PartitionSpec takes that and an
    AbstractMesh stays. ValueError naming `what` when it has no mesh or does not fit the shape."""
    if isinstance(sharding, jax.sharding.PartitionSpec):
        in_use = jax.sharding.get_abstract_mesh() if traced else _mesh(what, mesh, None)
        if in_use.empty:
            raise _no_mesh(what)
        sharding = jax.sharding.NamedSharding(in_use, sharding)
    if not isinstance(sharding, jax.sharding.Sharding):
        raise ValueError(f"{what}: must be a jax.sharding.Sharding, got {sharding!r}")  # noqa: TRY004
    if isinstance(sharding, jax.sharding.NamedSharding):
        if isinstance(sharding.mesh, jax.sharding.AbstractMesh) and not traced:
            sharding = jax.sharding.NamedSharding(_mesh(what, mesh, sharding.mesh), sharding.spec)
        if len(sharding.spec) > len(shape):
            raise ValueError(
                f"{what}: the PartitionSpec {sharding.spec} has {len(sharding.spec)} entries, "
                f"more than the {len(shape)} dimensions of the shape {shape}"
            )
    return sharding


def _mesh(what, mesh, abstract):
    """The concrete mesh `mesh`, else jax.set_mesh's, matching `abstract` (an AbstractMesh)."""
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    if mesh.empty:
        raise _no_mesh(what)
    if abstract is not None and abstract.shape_tuple != mesh.shape_tuple:
        raise ValueError(
            f"{what}: its sharding is on the mesh {dict(abstract.shape)}, the mesh in use is "
            f"{dict(mesh.shape)}"
        )
    return mesh


def _no_mesh(what):
    return ValueError(
        f"{what}: names no concrete mesh (a PartitionSpec, an AbstractMesh); call inside "
        "`with jax.set_mesh(mesh)`, or give a NamedSharding on a jax.sharding.Mesh"
    )


def _dtype_name(dtype, what):
    """The DType name of a jax dtype; float64 only where jax keeps it (jax_enable_x64)."""
    name = _rules.dtype_name(dtype, what)
    if name == "DTYPE_FLOAT64" and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{what}: float64 arrays need jax.config.update('jax_enable_x64', True); "
            "without it JAX would silently store float32"
        )
    return name


def _block(index, shape):
    """A device's index (a tuple of slices) as a block: ((start, stop), ...) per dimension."""
    block = []
    for piece, n in zip(index, shape):
        start, stop, step = piece.indices(n)
        if step != 1:
            raise ValueError(f"a sharding index with step {step} is not a block")
        block.append((start, max(start, stop)))
    return tuple(block)


def _check_shape(shape):
    try:
        dims = [int(n) for n in shape]
    except (TypeError, ValueError):
        raise ValueError(f"shape: must be a sequence of ints >= 0, got {shape!r}") from None
    if any(n < 0 or n != d for n, d in zip(dims, shape)):
        raise ValueError(f"shape: must be a sequence of ints >= 0, got {shape!r}")
    return dims


def _check_permute(permute, rank):
    axes = [int(p) for p in permute]
    if sorted(axes) != list(range(rank)):
        raise ValueError(f"permute: must be a permutation of 0..{rank - 1}, got {permute!r}")
    return axes
