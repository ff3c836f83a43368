"""How to reach a server: `Security` for one that uses TLS, mutual TLS or a bearer token.

The options mirror the Rust CLI's (--tls-ca, --tls-cert, --tls-key, --tls-server-name,
--auth-token-file) and `Security.from_env()` reads the same environment variables. Targets are
written as the CLI takes them: "HOST:PORT", "http://HOST:PORT" or "https://HOST:PORT".
The target and the options are checked by the same Rust code as the CLI's (weightinit._native),
which words its refusals (weightinit.errors.InvalidOption) with these arguments' names; a call
that cannot reach its server raises `ServerUnreachable`, which names the address, the cause and
the fix, as the CLI does.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidOption, ServerUnreachable

__all__ = ["Security", "ServerUnreachable"]

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
    Files are read when a Client opens its channel, so a renewed certificate or token is picked
    up by the next call. Options of the wrong type raise TypeError here; a file that is missing
    or holds no PEM, a token a server cannot accept, and combinations that cannot work raise
    weightinit.errors.InvalidOption (a ValueError) when a Client is made, before anything is
    dialed.
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
        if self.token is not None and not isinstance(self.token, str):
            raise TypeError(f"token is a str, not {type(self.token).__name__}")
        if self.token is not None and self.token_file is not None:
            raise ValueError("token and token_file are two ways to give one token: pass one")

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


def native_options(security: Security | None = None) -> dict:
    """The keyword arguments of weightinit._native.Remote for `security` (None for plaintext):
    each PEM and the token as (bytes, the path they were read from or None), for the Rust side
    to check and to name in its messages."""
    security = security or Security()
    options = {"tls_server_name": security.tls_server_name}
    for name in ("tls_ca", "tls_cert", "tls_key"):
        options[name] = _given(getattr(security, name), name)
    if security.token_file is not None:
        options["token"] = _given(security.token_file, "token_file")
    elif security.token is not None:
        options["token"] = (security.token.encode(), None)
    return options


def _given(source, name):
    """(bytes, None) for bytes given as they are, else (the file's content, its path)."""
    if source is None or isinstance(source, bytes):
        return None if source is None else (source, None)
    path = os.fspath(source)
    try:
        return Path(path).read_bytes(), path
    except OSError as error:
        raise InvalidOption(name, f"{name}: cannot read {path}: {error.strerror}") from error
