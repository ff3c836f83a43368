"""Calls to a weightinit server: tensors (Generate), digests (Digest), descriptions (Describe).

A `Client` keeps one channel to its target open across calls and gives every call a deadline.
Calls run in Rust (weightinit._native.Remote, tonic): a Generate stream is checked, hashed and
copied once into the destination arrays there, without the GIL.
The target "local" is no server: the engine runs in this process (weightinit._native, on all
cores, without the GIL), writing the same bytes straight into the destination arrays.
The module-level fetch(), digest() and describe() share one Client per target and Security, so
repeated calls reuse their connection too. Plaintext, or TLS, mutual TLS and a bearer token as a
`Security` passed as `security=` says.
"""

import ctypes
import importlib.util
import math
import os
import threading

import numpy as np

from weightinit.v1 import weightinit_pb2 as pb

from . import _native
from .errors import CallFailed, IntegrityError, RequestRefused, ServerUnreachable, native_errors
from .request import to_dict, to_message
from .security import Security, native_options

__all__ = [
    "DEFAULT_TIMEOUT",
    "LOCAL",
    "CallFailed",
    "Client",
    "IntegrityError",
    "RequestRefused",
    "ServerUnreachable",
    "describe",
    "digest",
    "fetch",
    "shared_client",
]

# The target that runs the engine in this process instead of calling a server.
LOCAL = "local"

# Seconds a call may take unless told otherwise: long enough to stream a large model's shard,
# short enough that a call to a server that hangs fails instead of waiting forever.
DEFAULT_TIMEOUT = 600.0

# Failed attempts in a row, without progress in between, that a call tries again (as the
# command line's fetch --retries): a restarting server is back within a few of the waits
# (100 ms at first, doubling up to 4 s), a dead one reported within about 15 s.
DEFAULT_RETRIES = 8

# Output element types, little-endian as on the wire. bfloat16 arrives as its raw 16-bit
# patterns, which numpy has no float type for.
_NUMPY_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}


class Client:
    """A connection to the weightinit server at `target` ("host:port"), reused by every call;
    target "local" runs the engine in this process instead (no channel, no deadline).

    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.
        Its files are read once, here, and the target and every option checked before anything
        is dialed (weightinit.errors.InvalidOption, a ValueError naming the option, if unusable).
    timeout: the default deadline of each call in seconds; None for no deadline.
    retries: failed attempts in a row (without progress in between) that a call tries again,
        after a backoff, when another attempt may help: a refused connection, a broken stream
        (a Generate then continues with the tensors that have not arrived). 0: none.

    A Client is thread-safe and a context manager that closes its channel.
    A server that cannot be reached raises weightinit.errors.ServerUnreachable, which names the
    address, the cause and the fix.
    """

    def __init__(
        self,
        target: str,
        *,
        security: Security | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ):
        if not isinstance(target, str):
            raise TypeError(f"target must be a str such as '127.0.0.1:50051', got {target!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"timeout: must be a positive number of seconds or None, got {timeout}"
            )
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: must be an int >= 0, got {retries!r}")
        self.target = target
        self.timeout = timeout
        self._security = security
        if target == LOCAL:
            if security not in (None, Security()):
                raise ValueError('security: target "local" runs in this process, over no network')
            self._remote = None
            return
        self._remote = native_errors(_native.Remote)(
            target, **native_options(security), retries=retries
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the channel once no call uses it any more."""
        self._remote = None

    def _open(self):
        if self._remote is None:
            raise ValueError(f"the Client of {self.target} is closed")
        return self._remote

    def _deadline(self, timeout):
        return self.timeout if timeout is None else timeout

    @native_errors
    def fetch(self, request, out=None, timeout=None):
        """Generates every tensor of `request` and returns them; see weightinit.fetch().
        timeout: seconds for this call (default: the client's)."""
        message = to_message(request)
        if self.target == LOCAL:
            return _generate_here(message, out)
        out = _destinations(out, [tensor.name for tensor in message.tensors])
        # Kept here, exported, until the call returns: Rust writes into their buffers.
        destinations = []

        def open_tensor(encoded):
            header = pb.TensorHeader.FromString(encoded)
            destination = _Destination(header, out.get(header.name))
            destinations.append(destination)
            return _address(destination.buffer), destination.length

        self._open().generate(message.SerializeToString(), self._deadline(timeout), open_tensor)
        return {d.name: d.value() for d in destinations}

    @native_errors
    def digest(self, request, timeout=None):
        """Returns {name: hex BLAKE3 digest}; see weightinit.digest()."""
        message = to_message(request)
        if self.target == LOCAL:
            plan = _native.Plan(message.SerializeToString())
            return {t.name: plan.digest(i).hex() for i, t in enumerate(message.tensors)}
        response = pb.DigestResponse.FromString(
            self._open().digest(message.SerializeToString(), self._deadline(timeout))
        )
        return {message.tensors[d.tensor_index].name: d.blake3.hex() for d in response.digests}

    @native_errors
    def describe(self, request, timeout=None):
        """Returns {name: TensorHeader in proto3 JSON form}; see weightinit.describe()."""
        message = to_message(request)
        if self.target == LOCAL:
            encoded = _native.Plan(message.SerializeToString()).describe()
        else:
            encoded = self._open().describe(message.SerializeToString(), self._deadline(timeout))
        response = pb.DescribeResponse.FromString(encoded)
        return {header.name: to_dict(header) for header in response.tensors}


def _generate_here(message, out):
    """fetch() for target "local": each tensor generated in this process into its destination."""
    out = _destinations(out, [tensor.name for tensor in message.tensors])
    plan = _native.Plan(message.SerializeToString())
    headers = pb.DescribeResponse.FromString(plan.describe()).tensors
    destinations = [_Destination(header, out.get(header.name)) for header in headers]
    # One call for all tensors: their jobs share the cores, with no set-up per tensor.
    plan.fill([(i, _address(d.buffer), d.length) for i, d in enumerate(destinations)])
    return {d.name: d.value() for d in destinations}


_SHARED = {}
_SHARED_LOCK = threading.Lock()
_FILE_FIELDS = ("tls_ca", "tls_cert", "tls_key", "token_file")


def shared_client(target, security=None):
    """The Client the module-level calls use for `target` and `security`, made on first use.

    A Client reads its certificate and token files once; this one is replaced (and the old one
    closed) when one of those files changes, so renewed certificates and tokens are still
    picked up by the next call.
    """
    security = security or Security()
    # A forked child gets a channel of its own: connections and threads do not survive fork.
    key = (target, security, os.getpid())
    stamp = _file_stamp(security)
    with _SHARED_LOCK:
        known = _SHARED.get(key)
        if known is not None and known[0] == stamp:
            return known[1]
        client = Client(target, security=security)
        _SHARED[key] = (stamp, client)
    if known is not None:
        known[1].close()
    return client


def _file_stamp(security):
    """(path, mtime, size) of every file `security` reads; None for one that cannot be stat'ed
    (opening the channel then reports it)."""
    stamp = []
    for name in _FILE_FIELDS:
        value = getattr(security, name)
        if value is None or isinstance(value, bytes):
            continue
        try:
            info = os.stat(value)
        except OSError:
            stamp.append((name, None))
        else:
            stamp.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamp)


def fetch(request, target, out=None, timeout=None, *, security=None):
    """Generates every tensor of `request` on the server at `target` and returns them;
    target "local" generates them in this process instead (the same bytes, on all cores).

    request: a GenerateRequest, or a dict in its proto3 JSON form.
    out: optional {tensor name: destination}; a destination is a writable C-contiguous buffer
        (a numpy array, bytearray, ...) of exactly the tensor's byte length, and the chunks are
        copied straight into it. Its element type is not checked: the bytes are the tensor's
        little-endian elements.
    timeout: seconds for the whole call; None for the default deadline, DEFAULT_TIMEOUT.
    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.

    Returns {name: array} in request order. A tensor fetched into `out` is returned as that
    destination object. Any other tensor is a new numpy.ndarray of the output shape and dtype
    (float32, float64 or float16), except bfloat16: a torch.bfloat16 tensor when torch is
    importable, otherwise a numpy uint16 array of the raw bfloat16 bit patterns.

    Calls that fail in a way another attempt may cure are retried (DEFAULT_RETRIES times in a
    row, with a backoff); see Client. The exceptions are weightinit.errors': RequestRefused (a
    ValueError and a grpc.RpcError) for a request the server or the local engine refuses,
    naming the field; ServerUnreachable when the server cannot be reached, naming the address
    and the cause; CallFailed (a grpc.RpcError) for other server errors; IntegrityError when
    what arrives is not what the server promised; InvalidOption (a ValueError) for a target or
    security options that cannot work, before anything is dialed.
    """
    message = to_message(request)
    return shared_client(target, security).fetch(message, out, timeout)


def _destinations(out, names):
    """`out` as a dict, refused if it names a tensor that is not in the request."""
    out = dict(out or {})
    unknown = sorted(set(out) - set(names))
    if unknown:
        raise ValueError(f"out names tensors that are not in the request: {unknown}")
    return out


class _Destination:
    """Where one tensor's bytes go: the caller's buffer, or a new array of the header's shape."""

    def __init__(self, header, dest):
        name = header.name
        dtype = _NUMPY_DTYPES.get(header.dtype)
        if dtype is None:
            raise IntegrityError(f"{name!r}: unknown dtype {header.dtype}")
        shape = tuple(header.output_shape)
        self.length = math.prod(shape) * dtype.itemsize
        if header.byte_length != self.length:
            raise IntegrityError(
                f"{name!r}: byte_length {header.byte_length} does not fit output shape {shape}"
            )
        self.name = name
        self.bfloat16 = header.dtype == pb.DTYPE_BFLOAT16 and dest is None
        try:
            self.result = np.empty(shape, dtype) if dest is None else dest
        except MemoryError as error:
            # NumPy's message says how many bytes and what shape; which tensor is for us to say.
            raise MemoryError(f"tensor {name!r}: {error}") from None
        self.buffer = _byte_view(self.result, self.length, name)

    def value(self):
        """What fetch() returns for the tensor once its bytes are in."""
        return _as_bfloat16(self.result) if self.bfloat16 else self.result


def _byte_view(dest, length, name):
    """A flat writable byte view of dest, which must hold exactly `length` bytes."""
    try:
        view = memoryview(dest)
    except TypeError:
        raise TypeError(f"out[{name!r}] is a {type(dest).__name__}, not a buffer") from None
    if view.readonly or not view.c_contiguous:
        raise ValueError(f"out[{name!r}] must be writable and C-contiguous")
    if view.nbytes != length:
        raise ValueError(f"out[{name!r}] has {view.nbytes} bytes, the tensor {length}")
    # memoryview cannot cast an empty view with a 0 in its shape; nothing is written there anyway.
    return view.cast("B") if length else memoryview(bytearray())


def _address(view):
    """The address of a writable byte view's first byte (0 for an empty one), for
    weightinit._native to write to while `view` keeps the buffer exported."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if view.nbytes else 0


def _as_bfloat16(bits):
    """Raw bfloat16 patterns as a torch.bfloat16 tensor (no copy) when torch is importable."""
    if importlib.util.find_spec("torch") is None:
        return bits
    import torch

    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def digest(request, target, timeout=None, *, security=None):
    """Returns {name: hex BLAKE3 digest} of every tensor's output, computed by the server.
    timeout and security: as for fetch()."""
    message = to_message(request)
    return shared_client(target, security).digest(message, timeout)


def describe(request, target, timeout=None, *, security=None):
    """Returns {name: TensorHeader in proto3 JSON form}: shapes, dtype, byte length, and what the
    scheme resolved to (fans, distribution, parameters), without generating anything.
    timeout and security: as for fetch()."""
    message = to_message(request)
    return shared_client(target, security).describe(message, timeout)
