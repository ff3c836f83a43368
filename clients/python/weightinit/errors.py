"""The exceptions of weightinit, and the one place that makes them from what fails in Rust.

weightinit._native raises one exception type, `_native.Failure`, with the failure described:
its kind, the gRPC status code, the option or request field at fault, and for a server that
could not be reached the cause and the address. The message is already worded for Python
callers (Security(...) arguments, not the command line's flags). `native_errors` turns a
Failure into the exception below that fits it; a tensor that does not fit in this process's
memory (target "local") becomes Python's own MemoryError, as NumPy raises.

The exceptions that stand for a failed call are grpc.RpcError too and answer code() and
details() as grpc's own error does, so that handlers written for grpc keep working.
"""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import grpc

from . import _native

_P = ParamSpec("_P")
_R = TypeVar("_R")
# grpc.StatusCode by the number on the wire.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class IntegrityError(Exception):
    """The Generate stream broke the protocol, or a tensor's bytes do not match its digest."""


class InvalidOption(ValueError):
    """An option that cannot work, refused before anything is dialed: `field` names it, such as
    "target" or "tls_ca"."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class CallFailed(grpc.RpcError):
    """A call the server (or the transport) ended with an error status.

    `field` is the request field the server named in its refusal, or None.
    """

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None):
        super().__init__(f"{code.name}: {details}")
        self.field = field
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The status code, as grpc.RpcError.code()."""
        return self._code

    def details(self) -> str:
        """The status message, as grpc.RpcError.details()."""
        return self._details


class RequestRefused(CallFailed, ValueError):
    """The request is invalid (INVALID_ARGUMENT) or over a limit (RESOURCE_EXHAUSTED), refused
    before any data by the server or, for target "local", by the engine in this process.

    `field` is the path of the field at fault, such as "tensors[0].shape".
    """

    def __init__(self, code: grpc.StatusCode | str, field: str, details: str):
        if isinstance(code, str):
            code = grpc.StatusCode[code]
        super().__init__(code, details, field)
        # A ValueError reads as its message alone.
        self.args = (details,)


class ServerUnreachable(CallFailed, ConnectionError):
    """A call could not reach its server (UNAVAILABLE), after the retries when another attempt
    could have helped. The message names the address, the cause and the fix.

    `address` is the "HOST:PORT" dialed; `cause` one of "refused", "unknown_host", "timed_out",
    "silent" (accepts connections, never answers), "no_route", "speaks_tls",
    "speaks_plaintext", "certificate", "client_certificate", "tls".
    """

    def __init__(self, details: str, address: str, cause: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)
        self.args = (details,)
        self.address = address
        self.cause = cause


def from_native(failure: _native.Failure) -> Exception:
    """The package's exception for a Failure of weightinit._native."""
    message = str(failure)
    if failure.kind == "options":
        return InvalidOption(failure.field, message)
    if failure.kind == "integrity":
        return IntegrityError(message)
    if failure.kind == "memory":
        return MemoryError(message)
    if failure.kind == "unreachable":
        return ServerUnreachable(message, failure.address, failure.cause)
    code = _CODES[failure.code]
    refused = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # RESOURCE_EXHAUSTED without a field is a busy server, not a refused request.
    if code in refused and failure.field is not None:
        return RequestRefused(code, failure.field, message)
    return CallFailed(code, message, failure.field)


def native_errors(call: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wraps a function that calls weightinit._native: its Failures become the package's
    exceptions (raised without the Failure as context: it says nothing more)."""

    @functools.wraps(call)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return call(*args, **kwargs)
        except _native.Failure as failure:
            raise from_native(failure) from None

    return wrapped
