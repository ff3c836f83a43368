"""Targets and connection errors against real servers: "http://HOST:PORT" works as well as
"HOST:PORT", other spellings are refused with what to write, and a call that cannot reach its
server raises ServerUnreachable naming the address, the cause and the fix.
"""

import socket

import grpc
import pytest
from conftest import serve
from test_security import _ca, _leaf

import weightinit
from weightinit import Security
from weightinit.security import ServerUnreachable

TIMEOUT = 30
REQUEST = {"seed": 3, "tensors": [{"name": "w", "shape": [8, 4], "init": {"xavierUniform": {}}}]}
CALLS = [weightinit.fetch, weightinit.digest, weightinit.describe]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A TLS-only server: (its address, a Security trusting its CA, one trusting another CA)."""
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other_ca")
    _leaf(directory, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    flags = ("--tls-cert", directory / "server.pem", "--tls-key", directory / "server.key")
    with serve(tmp_path_factory.mktemp("server") / "stderr.log", *flags) as address:
        yield (
            address,
            Security(tls_ca=directory / "ca.pem"),
            Security(tls_ca=directory / "other_ca.pem"),
        )


def _closed_port():
    """A port nothing listens on: one just released by the kernel."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unreachable(call, target, security=None):
    with pytest.raises(ServerUnreachable) as raised:
        call(REQUEST, target, timeout=TIMEOUT, security=security)
    error = raised.value
    # Still what grpc raised, for handlers written for it.
    assert isinstance(error, grpc.RpcError) and isinstance(error, ConnectionError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(error.__cause__, grpc.RpcError)
    return str(error)


def test_http_scheme_and_bare_host_port_reach_the_same_server(target):
    expected = weightinit.digest(REQUEST, target, timeout=TIMEOUT)
    assert weightinit.digest(REQUEST, f"http://{target}", timeout=TIMEOUT) == expected
    assert weightinit.digest(REQUEST, f"http://{target}/", timeout=TIMEOUT) == expected
    _, port = target.rsplit(":", 1)
    assert weightinit.describe(REQUEST, f"localhost:{port}", timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("localhost", "write 'localhost:50051'"),
        ("http://localhost", "write 'localhost:50051'"),
        ("grpc://localhost:50051", "grpc:// is not a scheme"),
        ("dns:///localhost:50051", "is not a server address"),
        ("http://localhost:50051/api", "is not a server address"),
        ("localhost:99999", "no valid port"),
        ("https://localhost:50051", "needs security=Security(tls_ca=...)"),
    ],
)
def test_targets_that_cannot_work_say_what_to_write(given, says):
    for call in CALLS:
        with pytest.raises(ValueError, match=r"^target: ") as raised:
            call(REQUEST, given, timeout=TIMEOUT)
        assert says in str(raised.value)
        assert "50051" in str(raised.value)
    with pytest.raises(TypeError, match="target must be a str"):
        weightinit.digest(REQUEST, ("localhost", 50051))


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_connection_refused_names_the_address(call):
    port = _closed_port()
    message = _unreachable(call, f"127.0.0.1:{port}")
    assert message.startswith(f"connection refused at 127.0.0.1:{port}: "), message
    assert f"weightinit serve --addr 0.0.0.0:{port}" in message


def test_unknown_host_names_the_host():
    # RFC 2606 reserves .invalid: it never resolves.
    message = _unreachable(weightinit.digest, "http://no-such-host.invalid:50051")
    assert message.startswith("unknown host no-such-host.invalid "), message


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_tls_on_one_side_only_is_named_with_the_fix(call, tls, target):
    address, trusting, _ = tls
    message = _unreachable(call, address)
    assert message.startswith(f"TLS mismatch at {address}: the server speaks TLS"), message
    assert "security=Security(tls_ca=...)" in message
    message = _unreachable(call, target, trusting)
    assert message.startswith(f"TLS mismatch at {target}: the server speaks plaintext"), message
    assert "without tls_ca" in message


def test_a_certificate_from_another_ca_is_named(tls):
    address, trusting, distrusting = tls
    assert weightinit.digest(REQUEST, f"https://{address}", timeout=TIMEOUT, security=trusting)
    message = _unreachable(weightinit.digest, address, distrusting)
    assert message.startswith(f"TLS at {address}: the server's certificate does not verify"), (
        message
    )


def test_server_errors_are_not_rewritten(target):
    with pytest.raises(grpc.RpcError) as raised:
        weightinit.digest({"tensors": [{"name": "w", "shape": [8]}]}, target, timeout=TIMEOUT)
    assert not isinstance(raised.value, ServerUnreachable)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
