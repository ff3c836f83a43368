"""GenerateRequest messages from their proto3 JSON form, and responses back to it.

A request may be given as a `GenerateRequest` message or as a dict in proto3 JSON form, the form
grpcurl users type and the shared test vectors use, e.g.

    {"seed": 42, "tensors": [{"name": "fc.weight", "shape": [10, 784],
                              "init": {"xavierUniform": {}}}]}

Unknown fields are errors, so a misspelt field never silently falls back to a default.
"""

import operator
from collections.abc import Mapping

from google.protobuf import json_format

from weightinit.v1 import weightinit_pb2 as pb

SEED_MAX = 2**64 - 1


def check_seed(seed):
    """Returns `seed` as an int; ValueError unless it is a u64: an int, a NumPy integer, a 0-d
    integer torch tensor (anything with __index__ but bool), or its decimal string as proto3
    JSON writes 64-bit integers."""
    value = seed
    if isinstance(seed, str) and seed.isascii() and seed.isdigit():
        value = int(seed)
    elif not isinstance(seed, bool) and hasattr(type(seed), "__index__"):
        try:
            value = operator.index(seed)
        except TypeError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"seed: must be in 0..2**64-1, got {seed!r}")
    return value


def to_message(request):
    """Returns `request` as a GenerateRequest (a message is returned as is).

    Raises ValueError for a seed outside 0..2**64-1, google.protobuf.json_format.ParseError for
    a dict that is not a valid request form in any other way, TypeError for anything else.
    """
    if isinstance(request, pb.GenerateRequest):
        return request
    if isinstance(request, Mapping):
        if "seed" in request:
            check_seed(request["seed"])
        return json_format.ParseDict(request, pb.GenerateRequest())
    raise TypeError(
        f"a request is a weightinit.v1.GenerateRequest or a dict in proto3 JSON form, "
        f"not {type(request).__name__}"
    )


def to_dict(message):
    """Returns a response message in proto3 JSON form, fields left at their defaults included."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
