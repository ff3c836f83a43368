"""Calls to a weightinit server: tensors (Generate), digests (Digest), descriptions (Describe).

A `Client` keeps one channel to its target open across calls and gives every call a deadline.
The target "local" is no server: the engine runs in this process (weightinit._native, on all
cores, without the GIL), writing the same bytes straight into the destination arrays.
The module-level fetch(), digest() and describe() share one Client per target and Security, so
repeated calls reuse their connection too. Plaintext, or TLS, mutual TLS and a bearer token as a
`Security` passed as `security=` says.
"""

import contextlib
import ctypes
import importlib.util
import math
import os
import threading

import blake3
import grpc
import numpy as np

from weightinit.v1 import weightinit_pb2 as pb
from weightinit.v1 import weightinit_pb2_grpc as pb_grpc

from . import _native
from .request import to_dict, to_message
from .security import Security, explained, open_channel

# Largest response message accepted; well above any chunk the server may send (grpc's own
# default, 4 MiB, is below what a client may ask for with chunk_bytes).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

# The target that runs the engine in this process instead of calling a server.
LOCAL = "local"

# Seconds a call may take unless told otherwise: long enough to stream a large model's shard,
# short enough that a call to a server that hangs fails instead of waiting forever.
DEFAULT_TIMEOUT = 600.0

# Output element types, little-endian as on the wire. bfloat16 arrives as its raw 16-bit
# patterns, which numpy has no float type for.
_NUMPY_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}


class IntegrityError(Exception):
    """The Generate stream broke the protocol, or a tensor's bytes do not match its digest."""


class RequestRefused(grpc.RpcError, ValueError):
    """The request is invalid (INVALID_ARGUMENT) or over a limit (RESOURCE_EXHAUSTED), refused
    before any data by the server or, for target "local", by the engine in this process.

    `field` is the path of the field at fault, such as "tensors[0].shape"; code() and details()
    answer as grpc's own error does, so handlers written for grpc.RpcError keep working.
    """

    def __init__(self, code, field, message):
        super().__init__(message)
        self.field = field
        self._code = grpc.StatusCode[code]
        self._details = message

    def code(self):
        return self._code

    def details(self):
        return self._details


def _refused(error):
    """The server's INVALID_ARGUMENT as a RequestRefused; its details read "field: reason"."""
    details = error.details() or ""
    return RequestRefused("INVALID_ARGUMENT", details.split(": ", 1)[0], details)


class Client:
    """A connection to the weightinit server at `target` ("host:port"), reused by every call;
    target "local" runs the engine in this process instead (no channel, no deadline).

    security: a weightinit.Security for TLS, mutual TLS or a bearer token; None for plaintext.
        Its files are read once, here, before anything is dialed (ValueError if unusable).
    timeout: the default deadline of each call in seconds; None for no deadline.

    A Client is thread-safe (gRPC channels are) and a context manager that closes its channel.
    A server that cannot be reached raises weightinit.security.ServerUnreachable, which names the
    address, the cause and the fix.
    """

    def __init__(self, target, *, security=None, timeout=DEFAULT_TIMEOUT):
        if not isinstance(target, str):
            raise TypeError(f"target must be a str such as '127.0.0.1:50051', got {target!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"timeout: must be a positive number of seconds or None, got {timeout}"
            )
        self.target = target
        self.timeout = timeout
        self._security = security
        if target == LOCAL:
            if security not in (None, Security()):
                raise ValueError('security: target "local" runs in this process, over no network')
            self._channel = None
            return
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        self._channel, self._metadata = open_channel(target, security, options)
        self._stub = pb_grpc.WeightInitStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the channel; calls in flight are cancelled."""
        if self._channel is not None:
            self._channel.close()

    def _deadline(self, timeout):
        return self.timeout if timeout is None else timeout

    def fetch(self, request, out=None, timeout=None):
        """Generates every tensor of `request` and returns them; see weightinit.fetch().
        timeout: seconds for this call (default: the client's)."""
        message = to_message(request)
        if self._channel is None:
            return _generate_here(message, out)
        with self._explained():
            responses = self._stub.Generate(
                message, timeout=self._deadline(timeout), metadata=self._metadata
            )
            return read_stream(responses, message, out)

    def digest(self, request, timeout=None):
        """Returns {name: hex BLAKE3 digest}; see weightinit.digest()."""
        message = to_message(request)
        if self._channel is None:
            plan = _native.Plan(message.SerializeToString())
            return {t.name: plan.digest(i).hex() for i, t in enumerate(message.tensors)}
        with self._explained():
            response = self._stub.Digest(
                message, timeout=self._deadline(timeout), metadata=self._metadata
            )
        return {message.tensors[d.tensor_index].name: d.blake3.hex() for d in response.digests}

    def describe(self, request, timeout=None):
        """Returns {name: TensorHeader in proto3 JSON form}; see weightinit.describe()."""
        message = to_message(request)
        if self._channel is None:
            response = pb.DescribeResponse.FromString(
                _native.Plan(message.SerializeToString()).describe()
            )
        else:
            with self._explained():
                response = self._stub.Describe(
                    message, timeout=self._deadline(timeout), metadata=self._metadata
                )
        return {header.name: to_dict(header) for header in response.tensors}

    @contextlib.contextmanager
    def _explained(self):
        """A server that cannot be reached as ServerUnreachable, a refused request as
        RequestRefused; other errors as grpc raised them."""
        try:
            with explained(self.target, self._security):
                yield
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise _refused(error) from error
            raise


def _generate_here(message, out):
    """fetch() for target "local": each tensor generated in this process into its destination."""
    out = _destinations(out, [tensor.name for tensor in message.tensors])
    plan = _native.Plan(message.SerializeToString())
    results = {}
    for index, header in enumerate(pb.DescribeResponse.FromString(plan.describe()).tensors):
        destination = _Destination(header, out.get(header.name))
        plan.fill(index, _address(destination.buffer), destination.length)
        results[header.name] = destination.value()
    return results


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
    # A forked child gets a channel of its own: gRPC channels do not survive fork.
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

    Raises RequestRefused (a ValueError and a grpc.RpcError) for a request the server or the
    local engine refuses, naming the field; grpc.RpcError for other server errors; IntegrityError when what arrives is not what the server promised, ValueError for a request
    or security options that cannot work (before anything is dialed).
    """
    message = to_message(request)
    return shared_client(target, security).fetch(message, out, timeout)


def read_stream(responses, request, out=None):
    """Assembles the GenerateResponse stream `responses` of `request`; see fetch().

    Checks that tensors arrive in request order, that each tensor's chunks are contiguous and add
    up to its byte length, and that the BLAKE3 digest of its bytes equals the one in TensorEnd.
    """
    message = to_message(request)
    names = [tensor.name for tensor in message.tensors]
    out = _destinations(out, names)

    results = {}
    receiver = None
    for response in responses:
        item = response.WhichOneof("item")
        if item == "header":
            if receiver is not None:
                raise IntegrityError(f"tensor {receiver.name!r} has no end before the next header")
            if len(results) == len(names):
                raise IntegrityError("header of a tensor beyond the request's")
            name = names[len(results)]
            receiver = _Receiver(response.header, len(results), name, out.get(name))
        elif item is None:
            raise IntegrityError("empty GenerateResponse")
        elif receiver is None:
            raise IntegrityError(f"{item} outside a tensor (no header before it)")
        elif item == "chunk":
            receiver.write(response.chunk)
        else:
            results[receiver.name] = receiver.finish(response.end)
            receiver = None
    if receiver is not None or len(results) != len(names):
        raise IntegrityError(f"stream ended after {len(results)} of {len(names)} tensors")
    return results


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
        self.result = np.empty(shape, dtype) if dest is None else dest
        self.buffer = _byte_view(self.result, self.length, name)

    def value(self):
        """What fetch() returns for the tensor once its bytes are in."""
        return _as_bfloat16(self.result) if self.bfloat16 else self.result


class _Receiver(_Destination):
    """Receives one tensor's chunks into its destination and checks them against its header."""

    def __init__(self, header, index, name, dest):
        if header.index != index or header.name != name:
            raise IntegrityError(
                f"header for tensor {header.index} {header.name!r}, expected {index} {name!r}"
            )
        super().__init__(header, dest)
        self.index = index
        self.hasher = blake3.blake3()
        self.received = 0

    def write(self, chunk):
        """Copies one chunk into place, once, and adds it to the digest."""
        if chunk.tensor_index != self.index:
            raise IntegrityError(f"chunk of tensor {chunk.tensor_index} inside {self.name!r}")
        if chunk.offset != self.received:
            raise IntegrityError(
                f"{self.name!r}: chunk at offset {chunk.offset}, expected {self.received}"
            )
        data = chunk.data
        stop = self.received + len(data)
        if stop > self.length:
            raise IntegrityError(f"{self.name!r}: chunks run past byte_length {self.length}")
        self.buffer[self.received : stop] = data
        self.hasher.update(data)
        self.received = stop

    def finish(self, end):
        """Checks the tensor is complete and its digest matches; returns the result."""
        if end.tensor_index != self.index:
            raise IntegrityError(f"end of tensor {end.tensor_index} inside {self.name!r}")
        if end.byte_length != self.length or self.received != self.length:
            raise IntegrityError(
                f"{self.name!r}: received {self.received} bytes, end says {end.byte_length}, "
                f"header said {self.length}"
            )
        digest = self.hasher.digest()
        if end.blake3 != digest:
            raise IntegrityError(
                f"{self.name!r}: BLAKE3 of the received bytes is {digest.hex()}, "
                f"the server's is {end.blake3.hex()}"
            )
        return self.value()


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
