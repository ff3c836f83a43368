"""Targets and connection errors against real servers: "http://HOST:PORT" works as well as
"HOST:PORT", other spellings are refused with what to write (the same rules as the CLI's),
and a call that cannot reach its server raises ServerUnreachable naming the address, the cause
and the fix in the words of Security(...), after retrying when another attempt may help.
"""

import socket
import threading
import time

import blake3
import grpc
import pytest
from conftest import serve
from test_security import _ca, _leaf

import weightinit
from weightinit import Security
from weightinit import client as client_module
from weightinit.errors import InvalidOption, RequestRefused, ServerUnreachable

TIMEOUT = 30
REQUEST = {"seed": 3, "tensors": [{"name": "w", "shape": [8, 4], "init": {"xavierUniform": {}}}]}
CALLS = [weightinit.fetch, weightinit.digest, weightinit.describe]
METHODS = ["fetch", "digest", "describe"]


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


def _unreachable(method, target, security=None, cause=None, retries=0):
    """The message of the ServerUnreachable that Client(target).method raises."""
    with (
        weightinit.Client(target, security=security, timeout=TIMEOUT, retries=retries) as client,
        pytest.raises(ServerUnreachable) as raised,
    ):
        getattr(client, method)(REQUEST)
    error = raised.value
    # Still what grpc raises, for handlers written for it.
    assert isinstance(error, grpc.RpcError) and isinstance(error, ConnectionError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.address == target.split("://")[-1]
    if cause is not None:
        assert error.cause == cause
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
        # As the CLI: a URL's default port (80) is not a weightinit server's.
        ("http://127.0.0.1", "has no valid port; write '127.0.0.1:50051'"),
        ("grpc://localhost:50051", "grpc:// is not a scheme"),
        ("dns:///localhost:50051", "dns:// is not a scheme"),
        ("http://localhost:50051/api", "is not a server address"),
        ("localhost:99999", "no valid port"),
        ("https://localhost:50051", "needs security=Security(tls_ca=...)"),
    ],
)
def test_targets_that_cannot_work_say_what_to_write(given, says):
    for call in CALLS:
        with pytest.raises(InvalidOption, match=r"^target: ") as raised:
            call(REQUEST, given, timeout=TIMEOUT)
        assert raised.value.field == "target"
        assert says in str(raised.value)
        assert "50051" in str(raised.value)
        assert "--" not in str(raised.value), "no command-line flags"
    with pytest.raises(TypeError, match="target must be a str"):
        weightinit.digest(REQUEST, ("localhost", 50051))


@pytest.mark.parametrize("method", METHODS)
def test_connection_refused_names_the_address(method):
    port = _closed_port()
    message = _unreachable(method, f"127.0.0.1:{port}", cause="refused")
    assert message.startswith(f"connection refused at http://127.0.0.1:{port}: "), message
    assert f"weightinit serve --addr 0.0.0.0:{port}" in message
    assert "pass as target the address" in message


def test_refused_connections_are_retried_with_backoff_then_given_up():
    port = _closed_port()
    started = time.monotonic()
    message = _unreachable("digest", f"127.0.0.1:{port}", cause="refused", retries=3)
    # Waits of 50-100, 100-200 and 200-400 ms between the four attempts.
    assert time.monotonic() - started >= 0.35
    assert message.endswith("gave up after 4 failed attempts in a row"), message


def test_unknown_host_names_the_host():
    # RFC 2606 reserves .invalid: it never resolves.
    message = _unreachable("digest", "http://no-such-host.invalid:50051", cause="unknown_host")
    assert message.startswith("unknown host no-such-host.invalid in target "), message


def test_a_peer_that_never_answers_fails_fast_with_what_it_is():
    with socket.socket() as silent:  # accepts connections (backlog), never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        message = _unreachable("digest", address, cause="silent", retries=8)
    assert time.monotonic() - started < 10, "not the call's 30 s timeout"
    assert message.startswith(f"no answer from http://{address}: it accepts connections"), message


@pytest.mark.parametrize("method", METHODS)
def test_tls_on_one_side_only_is_named_with_the_fix(method, tls, target):
    address, trusting, _ = tls
    message = _unreachable(method, address, cause="speaks_tls")
    assert message.startswith(f"TLS mismatch at http://{address}: the server speaks TLS"), message
    assert f"write 'https://{address}' with security=Security(tls_ca=...)" in message
    message = _unreachable(method, target, trusting, cause="speaks_plaintext")
    assert message.startswith(f"TLS mismatch at https://{target}: the server speaks plaintext")
    assert "without tls_ca, tls_cert, tls_key and tls_server_name in Security(...)" in message
    assert "--tls" not in message, "no command-line flags"


def test_a_certificate_from_another_ca_is_named(tls):
    address, trusting, distrusting = tls
    assert weightinit.digest(REQUEST, f"https://{address}", timeout=TIMEOUT, security=trusting)
    message = _unreachable("digest", address, distrusting, cause="certificate")
    assert message.startswith(
        f"TLS at https://{address}: the server's certificate is not signed by the CA in tls_ca"
    ), message


def test_server_refusals_name_the_field(target):
    with pytest.raises(RequestRefused) as raised:
        weightinit.digest({"tensors": [{"name": "w", "shape": [8]}]}, target, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.field == "tensors[0].init"
    assert str(raised.value).startswith("tensors[0].init: "), str(raised.value)


# Big enough that the stream is still running when the second tensor's header arrives.
LARGE = {
    "seed": 8,
    "tensors": [{"name": f"t{i}", "shape": [1024, 2048], "init": {"normal": {}}} for i in range(4)],
}


def _kill_at_second_header(monkeypatch, server, then=None):
    """Kills `server` (SIGKILL) when fetch() opens the second tensor's destination, then runs
    `then`; returns the list of headers opened."""
    opened = []
    real = client_module._Destination

    def destination(header, dest):
        opened.append(header.name)
        if len(opened) == 2:
            server.kill()
            server.wait()
            if then is not None:
                then()
        return real(header, dest)

    monkeypatch.setattr(client_module, "_Destination", destination)
    return opened


def test_a_server_killed_mid_fetch_and_back_is_resumed(tmp_path, monkeypatch):
    expected = weightinit.digest(LARGE, "local")
    started, restarted = [], threading.Event()
    with serve(tmp_path / "first.log", started=started) as address:

        def restart():
            # The same port: the retries find the new server there.
            def run():
                with serve(tmp_path / "second.log", addr=address):
                    restarted.set()
                    done.wait(60)

            threading.Thread(target=run, daemon=True).start()
            restarted.wait(30)

        done = threading.Event()
        opened = _kill_at_second_header(monkeypatch, started[0], restart)
        try:
            with weightinit.Client(address, timeout=TIMEOUT) as client:
                arrays = client.fetch(LARGE)
        finally:
            done.set()
    assert restarted.is_set()
    # The tensor that broke off went to the destination it had: no second one.
    assert opened == ["t0", "t1", "t2", "t3"]
    assert {name: blake3.blake3(a.tobytes()).hexdigest() for name, a in arrays.items()} == expected


def _killed_for_good(tmp_path, monkeypatch, call, retries):
    """call(client) against a server killed (for good) at the second tensor's header; returns
    the ServerUnreachable it raised and the server's address."""
    started = []
    with serve(tmp_path / "stderr.log", started=started) as address:
        _kill_at_second_header(monkeypatch, started[0])
        with (
            weightinit.Client(address, timeout=TIMEOUT, retries=retries) as client,
            pytest.raises(ServerUnreachable) as raised,
        ):
            call(client)
    return raised.value, address


def test_a_server_killed_mid_fetch_for_good_is_unreachable(tmp_path, monkeypatch):
    error, address = _killed_for_good(tmp_path, monkeypatch, lambda c: c.fetch(LARGE), 2)
    assert error.address == address and error.cause == "refused"
    message = str(error)
    assert message.startswith(f"connection refused at http://{address}: "), message
    assert message.endswith("gave up after 3 failed attempts in a row"), message


def test_a_server_killed_mid_init_module_says_what_was_written(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import weightinit.torch as wt

    model = torch.nn.Sequential(
        torch.nn.Linear(2048, 1024), torch.nn.LayerNorm(1024), torch.nn.Linear(1024, 2048)
    )
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)
    error, _ = _killed_for_good(tmp_path, monkeypatch, lambda c: wt.init_module(model, 8, c), 1)
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "nothing but the draws of 0.weight, 0.bias, 2.weight, 2.bias" in notes, notes
    # The constants come after every draw arrived: the LayerNorm is as it was.
    assert torch.all(model[1].weight == 7.0) and torch.all(model[1].bias == 7.0)
