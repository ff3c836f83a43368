"""Python client of weightinit: byte-identical initial weights from a weightinit server.

    import weightinit
    arrays = weightinit.fetch(request, "127.0.0.1:50051")    # {name: numpy.ndarray}

    with weightinit.Client("127.0.0.1:50051", timeout=120) as client:   # one channel, reused
        arrays = client.fetch(request)

    arrays = weightinit.fetch(request, "local")    # no server: the engine in this process

`security=weightinit.Security(...)` adds TLS, mutual TLS or a bearer token to any call.
`weightinit.torch.verify(model, seed, target)` proves every rank holds what the request serves:
it returns a `Report` or raises `WeightsDiffer` naming each tensor that differs and where.
Failures raise the exceptions of `weightinit.errors` (also here): RequestRefused, CallFailed,
ServerUnreachable, IntegrityError and InvalidOption.
`weightinit.torch` (imported on first use) initializes torch modules in place; `weightinit.jax`,
`weightinit.flax` and `weightinit.keras` do the same for sharded jax.Arrays, Flax parameters and
Keras 3 models.

The generated gRPC stubs live in `weightinit/_proto/weightinit/v1/` exactly as grpc_tools.protoc
writes them; they import each other as `weightinit.v1`, the proto package, so that directory is
added to this package's path and the stubs are importable as `weightinit.v1.weightinit_pb2`.
"""

import importlib
import os

__path__.append(os.path.join(os.path.dirname(__file__), "_proto", "weightinit"))

from ._verify import Report, WeightsDiffer
from .client import LOCAL, Client, describe, digest, fetch
from .errors import CallFailed, IntegrityError, InvalidOption, RequestRefused, ServerUnreachable
from .request import to_message
from .security import Security

__all__ = [
    "LOCAL",
    "CallFailed",
    "Client",
    "IntegrityError",
    "InvalidOption",
    "Report",
    "RequestRefused",
    "Security",
    "ServerUnreachable",
    "WeightsDiffer",
    "describe",
    "digest",
    "fetch",
    "to_message",
]


def __getattr__(name):
    """Imports `weightinit.torch`, `.jax`, `.flax` or `.keras` on first access, so that the
    frameworks stay optional."""
    if name in ("torch", "jax", "flax", "keras"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
