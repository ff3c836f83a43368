"""How to reach a server: its address (a target), and `Security` for one that uses TLS, mutual
TLS or a bearer token.

The options mirror the Rust CLI's (--tls-ca, --tls-cert, --tls-key, --tls-server-name,
--auth-token-file) and `Security.from_env()` reads the same environment variables. Targets are
written as the CLI takes them: "HOST:PORT", "http://HOST:PORT" or "https://HOST:PORT". A call
that cannot reach its server raises `ServerUnreachable`, which names the address, the cause and
the fix, as the CLI does.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# Environment variable of each field, as the Rust CLI names them. WEIGHTINIT_TLS_CERT is the
# server's own certificate, hence the CLIENT_ in the client's.
_ENV = {
    "tls_ca": "WEIGHTINIT_TLS_CA",
    "tls_cert": "WEIGHTINIT_CLIENT_TLS_CERT",
    "tls_key": "WEIGHTINIT_CLIENT_TLS_KEY",
    "tls_server_name": "WEIGHTINIT_TLS_SERVER_NAME",
    "token_file": "WEIGHTINIT_AUTH_TOKEN_FILE",
}

# What each field but the token may be: a path, PEM bytes, a name.
_KINDS = {
    "tls_ca": (str, os.PathLike, bytes),
    "tls_cert": (str, os.PathLike, bytes),
    "tls_key": (str, os.PathLike, bytes),
    "tls_server_name": (str,),
    "token_file": (str, os.PathLike),
}
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# The server's limits on a token: 1 to 4096 visible ASCII characters (it travels in a header).
_TOKEN = re.compile(r"[!-~]{1,4096}")
# [SCHEME://]HOST[:PORT][/]: the host a name, an IPv4 address or a bracketed IPv6 address.
_TARGET = re.compile(
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?/?"
)
_TARGET_USAGE = (
    "write 'HOST:PORT' or 'http://HOST:PORT' (plaintext), or 'https://HOST:PORT' with "
    "security=Security(tls_ca=...), e.g. '127.0.0.1:50051'"
)


class ServerUnreachable(grpc.RpcError, ConnectionError):
    """A call could not reach its server; the message names the address, the cause and the fix.

    Raised from the grpc.RpcError it explains (its __cause__), and answers code() and details()
    as that error does, so handlers written for grpc.RpcError keep working.
    """

    def __init__(self, message: str, error: grpc.RpcError):
        super().__init__(message)
        self._error = error

    def code(self) -> grpc.StatusCode:
        """The status code of the failed call (UNAVAILABLE)."""
        return self._error.code()

    def details(self) -> str:
        """This error's explanation."""
        return str(self)


@dataclass(frozen=True)
class Security:
    """TLS, mutual TLS and bearer-token options of a connection; the default is plaintext.

    tls_ca: the CA certificate(s) the server's certificate must chain to; turns TLS on.
    tls_cert, tls_key: this client's certificate and private key, for a server that requires
        one (mutual TLS); both or neither, and only with tls_ca.
    tls_server_name: the name the server's certificate must have, instead of the target's host.
    token, token_file: the bearer token, or a file holding it (surrounding whitespace is
        dropped), sent as `authorization: Bearer <token>` with every call. Without TLS it
        travels in the clear.

    tls_ca, tls_cert and tls_key are paths (str or os.PathLike), or bytes holding the PEM itself.
    Files are read when a call opens its channel, so a renewed certificate or token is picked
    up by the next call; a file that is missing or holds no PEM raises ValueError then, before
    anything is dialed. Combinations that cannot work raise ValueError here.
    """

    tls_ca: str | os.PathLike | bytes | None = None
    tls_cert: str | os.PathLike | bytes | None = None
    tls_key: str | os.PathLike | bytes | None = None
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | os.PathLike | None = None

    def __post_init__(self):
        for name, kinds in _KINDS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kinds):
                raise TypeError(f"{name} cannot be a {type(value).__name__}")
            if value is not None and not os.fspath(value):
                raise ValueError(f"{name} is empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: the client's certificate and key")
        if self.tls_ca is None and (self.tls_cert is not None or self.tls_server_name is not None):
            raise ValueError("TLS options need tls_ca, the CA that signed the server's certificate")
        if self.token is not None and self.token_file is not None:
            raise ValueError("token and token_file are two ways to give one token: pass one")
        if self.token is not None:
            _check_token(self.token, "token")

    @classmethod
    def from_env(cls):
        """The options from the variables the Rust CLI reads: WEIGHTINIT_TLS_CA,
        WEIGHTINIT_CLIENT_TLS_CERT, WEIGHTINIT_CLIENT_TLS_KEY, WEIGHTINIT_TLS_SERVER_NAME and
        WEIGHTINIT_AUTH_TOKEN_FILE. One set but empty is a ValueError, as in the CLI: read as
        unset, an empty WEIGHTINIT_TLS_CA would quietly mean plaintext."""
        values = {name: os.environ.get(var) for name, var in _ENV.items()}
        empty = [_ENV[name] for name, value in values.items() if value == ""]
        if empty:
            raise ValueError(f"{', '.join(empty)} set but empty: give a value or unset it")
        return cls(**values)


def address(target: str, security: "Security | None" = None) -> str:
    """The "HOST:PORT" to dial for `target`: "HOST:PORT" or "http://HOST:PORT" (plaintext, or
    TLS when `security` has tls_ca), or "https://HOST:PORT" (TLS: needs tls_ca).

    Raises ValueError, saying what to write, for anything else (a missing port, another scheme,
    a path), and TypeError for a target that is not a str.
    """
    if not isinstance(target, str):
        raise TypeError(
            f"target must be a str such as '127.0.0.1:50051', not {type(target).__name__}"
        )
    match = _TARGET.fullmatch(target)
    if match is None:
        raise ValueError(f"target: {target!r} is not a server address; {_TARGET_USAGE}")
    scheme, host, port = match["scheme"], match["host"], match["port"]
    if scheme not in (None, "http", "https"):
        raise ValueError(f"target: {scheme}:// is not a scheme this client dials; {_TARGET_USAGE}")
    if port is None or not 0 < int(port) < 65536:
        raise ValueError(
            f"target: {target!r} has no valid port; write '{host}:50051' (or the port the server "
            "listens on)"
        )
    if scheme == "https" and (security is None or security.tls_ca is None):
        raise ValueError(
            f"target: {target!r} is TLS and needs security=Security(tls_ca=...), the CA that "
            f"signed the server's certificate; for plaintext write '{host}:{port}'"
        )
    return f"{host}:{port}"


def explain(cause, detail, addr):
    """What to tell about a server at `addr` ("HOST:PORT") that could not be reached, for the
    causes weightinit._native names (None for the others: its own message says them)."""
    host, port = addr.rsplit(":", 1)
    if cause == "refused":
        return (
            f"connection refused at {addr}: no server listens there; start one (weightinit serve "
            f"--addr 0.0.0.0:{port}) or pass the address a server prints when it starts"
        )
    if cause == "unknown_host":
        return f"unknown host {host} in target {addr!r} ({detail}); check the name, or give an IP"
    if cause == "speaks_plaintext":
        return (
            f"TLS mismatch at {addr}: the server speaks plaintext, this client TLS; call it "
            "without tls_ca, tls_cert, tls_key and tls_server_name in security"
        )
    if cause == "certificate":
        return (
            f"TLS at {addr}: the server's certificate does not verify against tls_ca ({detail}); "
            "pass the CA that signed it, and tls_server_name if the certificate's name differs"
        )
    if cause == "speaks_tls":
        return (
            f"TLS mismatch at {addr}: the server speaks TLS, this client plaintext; pass "
            "security=Security(tls_ca=...) with the CA that signed the server's certificate"
        )
    return None


def native_options(target, security=None):
    """The URL to dial for `target` and the keyword arguments of weightinit._native.Remote:
    the PEM bytes and token of `security` (None for plaintext).

    The target and every file are checked first, so a bad one fails here, not in a handshake.
    """
    security = security or Security()
    hostport = address(target, security)
    tls = security.tls_ca is not None
    options = {"token": _token(security), "tls_server_name": security.tls_server_name}
    if tls:
        options["tls_ca"] = _pem(security.tls_ca, "tls_ca", _CERTIFICATE, "certificate")
    if security.tls_cert is not None:
        options["tls_cert"] = _pem(security.tls_cert, "tls_cert", _CERTIFICATE, "certificate")
        options["tls_key"] = _pem(security.tls_key, "tls_key", _PRIVATE_KEY, "private key")
    return f"{'https' if tls else 'http'}://{hostport}", options


def _token(security):
    """The bearer token, read from token_file when that is how it is given."""
    if security.token_file is None:
        return None if security.token is None else _check_token(security.token, "token")
    content = _read(security.token_file, "token_file").decode("ascii", "replace")
    return _check_token(content, f"the token in {os.fspath(security.token_file)}")


def _check_token(token, where):
    """Returns the token without surrounding whitespace; ValueError unless the server could
    accept it."""
    if not isinstance(token, str):
        raise TypeError(f"{where} is a str, not {type(token).__name__}")
    stripped = token.strip()
    if not stripped:
        raise ValueError(f"{where} is empty")
    if not _TOKEN.fullmatch(stripped):
        raise ValueError(
            f"{where} must be 1 to 4096 visible ASCII characters without spaces "
            "(it travels in a header)"
        )
    return stripped


def _pem(source, name, marker, what):
    """The PEM bytes of `source` (bytes as given, else the file's content); ValueError unless
    they hold a PEM `what`, which grpc would otherwise only report as a failed handshake."""
    data = source if isinstance(source, bytes) else _read(source, name)
    if not marker.search(data):
        where = "the bytes given" if isinstance(source, bytes) else os.fspath(source)
        raise ValueError(f"{name}: no PEM {what} in {where}")
    return data


def _read(path, name):
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {os.fspath(path)}: {error.strerror}") from error
