"""Fetches blocks of tensors, each distinct block once and in as few Generate calls as the
request rules allow (framework-neutral: numpy only).

A block is a tuple of (start, stop), one per dimension of the tensor's view (its shape, permuted).
The blocks that several devices hold are fetched once. A tensor's distinct blocks that tile their
bounding box exactly (every block of a process on one host, say) are fetched as that one box and
cut apart locally; otherwise each is its own piece. Names must be unique within a request, so
pieces go out in rounds, one Generate per round: round r holds every tensor's r-th piece.
"""

import math
from collections import Counter
from typing import NamedTuple

import numpy as np

from . import _rules
from .client import IntegrityError, fetch


def fetch_blocks(seed, tensors, target, *, timeout=None, security=None):
    """Returns one {block: numpy.ndarray} per (spec, blocks) of `tensors`.

    spec: a TensorSpec in proto3 JSON form with name, shape, init and dtype set (permute and the
        other fields as wanted; no slice). blocks: an iterable of blocks of its view.
    The arrays are views of the fetched pieces, in the spec's dtype (bfloat16 as
    ml_dtypes.bfloat16).
    """
    counts = Counter(spec["name"] for spec, _ in tensors)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        raise ValueError(f"tensor names must be unique, these are used twice: {twice}")
    plans = []
    for spec, blocks in tensors:
        shape = _rules.view_shape(spec)
        distinct = list(dict.fromkeys(_check_block(block, shape, spec["name"]) for block in blocks))
        plans.append(_Plan(spec, shape, distinct, _pieces(distinct)))

    fetched = [{} for _ in plans]
    for round_ in range(max((len(plan.pieces) for plan in plans), default=0)):
        wanted = [(i, plan) for i, plan in enumerate(plans) if round_ < len(plan.pieces)]
        request = {
            "seed": seed,
            "tensors": [_sliced(plan.spec, plan.shape, plan.pieces[round_]) for _, plan in wanted],
        }
        arrays = fetch(request, target, timeout=timeout, security=security)
        for i, plan in wanted:
            piece = plan.pieces[round_]
            fetched[i][piece] = _as_numpy(arrays[plan.spec["name"]], plan.spec, piece)

    results = []
    for plan, arrays in zip(plans, fetched):
        out = {}
        for block in plan.blocks:
            piece = next(p for p in plan.pieces if _contains(p, block))
            out[block] = arrays[piece][
                tuple(slice(b0 - p0, b1 - p0) for (b0, b1), (p0, _) in zip(block, piece))
            ]
        results.append(out)
    return results


class _Plan(NamedTuple):
    """One tensor: its spec, view shape, distinct blocks and the pieces that hold them."""

    spec: dict
    shape: tuple
    blocks: list
    pieces: list


def _check_block(block, shape, name):
    block = tuple((int(start), int(stop)) for start, stop in block)
    if len(block) != len(shape) or any(
        not 0 <= start <= stop <= n for (start, stop), n in zip(block, shape)
    ):
        raise ValueError(f"{name}: block {block} is not within the shape {shape}")
    return block


def _volume(block):
    return math.prod(stop - start for start, stop in block)


def _disjoint(a, b):
    return any(a1 <= b0 or b1 <= a0 for (a0, a1), (b0, b1) in zip(a, b))


def _contains(outer, inner):
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner))


def _pieces(blocks):
    """The pieces to fetch for these distinct blocks: their bounding box when they tile it
    (pairwise disjoint, volumes adding up to the box's), otherwise the blocks themselves."""
    if len(blocks) <= 1:
        return blocks
    box = tuple((min(d[0] for d in dims), max(d[1] for d in dims)) for dims in zip(*blocks))
    disjoint = all(_disjoint(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    if disjoint and sum(map(_volume, blocks)) == _volume(box):
        return [box]
    return blocks


def _sliced(spec, shape, piece):
    """The spec asking for `piece` of its view (no slice for the whole view)."""
    if piece == tuple((0, n) for n in shape):
        return spec
    ranges = [{"start": str(start), "stop": str(stop)} for start, stop in piece]
    return {**spec, "slice": {"dims": {"ranges": ranges}}}


def _as_numpy(array, spec, piece):
    """A fetched piece as a numpy array of the spec's dtype, checked against the piece's shape
    (a server that predates `permute` ignores it and sends the unpermuted shape)."""
    if spec["dtype"] == "DTYPE_BFLOAT16" and not isinstance(array, np.ndarray):
        # fetch() returns bfloat16 as a torch.bfloat16 tensor when torch is importable.
        import torch

        array = array.view(torch.int16).numpy()
    array = array.view(_rules.numpy_dtype(spec["dtype"]))
    expected = tuple(stop - start for start, stop in piece)
    if array.shape != expected:
        raise IntegrityError(
            f"{spec['name']!r}: the server sent shape {array.shape}, expected {expected}"
            + (" (does it support permute?)" if spec.get("permute") else "")
        )
    return array
