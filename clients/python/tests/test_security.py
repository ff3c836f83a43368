"""weightinit.Security against real servers started with TLS, mutual TLS and a bearer token: the
same bytes as over plaintext, and every way a connection is refused.

The certificates are made with the openssl CLI: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate from the same CA, and another CA with a client certificate.
"""

import socket
import subprocess
from types import SimpleNamespace

import grpc
import pytest
from conftest import serve
from test_vectors import CASES, _raw

import weightinit
from weightinit import InvalidOption, Security, ServerUnreachable

TIMEOUT = 30
TOKEN = "s3cret-token-0123456789"
REQUEST = {"seed": 7, "tensors": [{"name": "w", "shape": [64, 32], "init": {"xavierUniform": {}}}]}
CALLS = [weightinit.fetch, weightinit.digest, weightinit.describe]


def _openssl(directory, command):
    subprocess.run(["openssl", *command.split()], cwd=directory, check=True, capture_output=True)


def _ca(directory, name):
    _openssl(
        directory,
        f"req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
        f"-subj /CN={name} -keyout {name}.key -out {name}.pem "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    )


def _leaf(directory, name, issuer, names, usage):
    """A certificate for `names` (subjectAltName) signed by CA `issuer`, for `usage`."""
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={names}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
    )
    _openssl(
        directory,
        f"req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN={name} "
        f"-keyout {name}.key -out {name}.csr",
    )
    _openssl(
        directory,
        f"x509 -req -in {name}.csr -CA {issuer}.pem -CAkey {issuer}.key -CAcreateserial -days 2 "
        f"-extfile {name}.ext -out {name}.pem",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other_ca")
    _leaf(directory, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    _leaf(directory, "client", "ca", "DNS:trainer-7", "clientAuth")
    _leaf(directory, "intruder", "other_ca", "DNS:intruder", "clientAuth")
    (directory / "token").write_text(TOKEN + "\n")
    files = {
        f"{name}_{kind}": directory / f"{name}.{kind}"
        for name in ("ca", "other_ca", "server", "client", "intruder")
        for kind in ("pem", "key")
    }
    return SimpleNamespace(dir=directory, token=directory / "token", **files)


def _server(tmp_path_factory, *flags):
    return serve(tmp_path_factory.mktemp("server") / "stderr.log", *flags)


@pytest.fixture(scope="module")
def tls_target(pki, tmp_path_factory):
    """A server that speaks TLS only."""
    flags = ("--tls-cert", pki.server_pem, "--tls-key", pki.server_key)
    with _server(tmp_path_factory, *flags) as address:
        yield address


@pytest.fixture(scope="module")
def mtls_target(pki, tmp_path_factory):
    """A server that wants a client certificate signed by pki's CA."""
    flags = ("--tls-cert", pki.server_pem, "--tls-key", pki.server_key)
    with _server(tmp_path_factory, *flags, "--tls-client-ca", pki.ca_pem) as address:
        yield address


@pytest.fixture(scope="module")
def token_target(pki, tmp_path_factory):
    """A plaintext server that wants the bearer token."""
    with _server(tmp_path_factory, "--auth-token-file", pki.token) as address:
        yield address


@pytest.fixture(scope="module")
def locked_target(pki, tmp_path_factory):
    """A server that wants all three: TLS, a client certificate and the bearer token."""
    flags = ("--tls-cert", pki.server_pem, "--tls-key", pki.server_key)
    flags += ("--tls-client-ca", pki.ca_pem, "--auth-token-file", pki.token)
    with _server(tmp_path_factory, *flags) as address:
        yield address


def _mtls(pki, **more):
    return Security(tls_ca=pki.ca_pem, tls_cert=pki.client_pem, tls_key=pki.client_key, **more)


# What each refusal says: the server's reason for UNAUTHENTICATED, and for UNAVAILABLE the
# cause of a ServerUnreachable and the fix in Security(...)'s words.
UNAUTHENTICATED = "this server needs `authorization: Bearer <token>`"
WRONG_TOKEN = "the bearer token is not valid"


def _refused(call, target, security, code, says, cause=None):
    with pytest.raises(grpc.RpcError) as raised:
        call(REQUEST, target, timeout=TIMEOUT, security=security)
    error = raised.value
    assert error.code() == code, error.details()
    assert says in error.details(), error.details()
    # The command line's flags are not the Python caller's (--tls-client-ca is the server's).
    assert not any(f in error.details() for f in ("--tls-ca", "--tls-cert", "--server")), (
        error.details()
    )
    if code == grpc.StatusCode.UNAVAILABLE:
        assert isinstance(error, ServerUnreachable)
        assert (error.address, error.cause) == (target, cause)


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_tls_gives_the_plaintext_bytes(case, pki, tls_target, target):
    tls = Security(tls_ca=pki.ca_pem)
    request = case["request"]
    over_tls = weightinit.fetch(request, tls_target, timeout=TIMEOUT, security=tls)
    plain = weightinit.fetch(request, target, timeout=TIMEOUT)
    assert list(over_tls) == list(plain)
    assert all(_raw(over_tls[name]) == _raw(plain[name]) for name in plain)

    expected = {expect["name"]: expect["blake3"] for expect in case["expect"]}
    assert weightinit.digest(request, tls_target, timeout=TIMEOUT, security=tls) == expected
    described = weightinit.describe(request, tls_target, timeout=TIMEOUT, security=tls)
    assert described == weightinit.describe(request, target, timeout=TIMEOUT)


def test_tls_server_name_is_the_name_checked(pki, tls_target):
    named = Security(tls_ca=pki.ca_pem, tls_server_name="localhost")
    assert weightinit.digest(REQUEST, tls_target, timeout=TIMEOUT, security=named)
    misnamed = Security(tls_ca=pki.ca_pem, tls_server_name="weights.example.com")
    says = "give tls_server_name a name the certificate has"
    _refused(weightinit.digest, tls_target, misnamed, UNAVAILABLE, says, "certificate")


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_plaintext_client_to_tls_server_is_unavailable(call, tls_target):
    says = "the server speaks TLS, this client plaintext"
    _refused(call, tls_target, None, UNAVAILABLE, says, "speaks_tls")


def test_client_trusting_another_ca_is_unavailable(pki, tls_target):
    other = Security(tls_ca=pki.other_ca_pem)
    says = "the server's certificate is not signed by the CA in tls_ca"
    _refused(weightinit.fetch, tls_target, other, UNAVAILABLE, says, "certificate")


@pytest.mark.parametrize("client", [None, "intruder"], ids=["no-certificate", "other-ca"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(client, pki, mtls_target):
    security = Security(tls_ca=pki.ca_pem)
    if client is not None:
        security = Security(
            tls_ca=pki.ca_pem,
            tls_cert=pki.dir / f"{client}.pem",
            tls_key=pki.dir / f"{client}.key",
        )
    # Security(...)'s words, not the CLI's "--tls-cert and --tls-key".
    says = "wants a client certificate signed by its --tls-client-ca; pass one from that CA: "
    says += "Security(tls_cert=..., tls_key=...)"
    with pytest.raises(ServerUnreachable) as raised:
        weightinit.fetch(REQUEST, mtls_target, timeout=TIMEOUT, security=security)
    assert raised.value.cause == "client_certificate" and raised.value.address == mtls_target
    assert says in str(raised.value), str(raised.value)


def test_mutual_tls_serves_a_client_certificate_from_its_ca(pki, mtls_target, target):
    mtls = _mtls(pki)
    fetched = weightinit.fetch(REQUEST, mtls_target, timeout=TIMEOUT, security=mtls)
    assert _raw(fetched["w"]) == _raw(weightinit.fetch(REQUEST, target, timeout=TIMEOUT)["w"])
    assert weightinit.digest(REQUEST, mtls_target, timeout=TIMEOUT, security=mtls) == (
        weightinit.digest(REQUEST, target, timeout=TIMEOUT)
    )
    assert weightinit.describe(REQUEST, mtls_target, timeout=TIMEOUT, security=mtls) == (
        weightinit.describe(REQUEST, target, timeout=TIMEOUT)
    )


def test_pem_bytes_work_as_well_as_paths(pki, mtls_target, target):
    pem = Security(
        tls_ca=pki.ca_pem.read_bytes(),
        tls_cert=pki.client_pem.read_bytes(),
        tls_key=pki.client_key.read_bytes(),
    )
    assert weightinit.digest(REQUEST, mtls_target, timeout=TIMEOUT, security=pem) == (
        weightinit.digest(REQUEST, target, timeout=TIMEOUT)
    )


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "security", [None, Security(token="not-the-token-at-all")], ids=["missing", "wrong"]
)
def test_calls_without_the_right_token_are_unauthenticated(security, call, token_target):
    says = UNAUTHENTICATED if security is None else WRONG_TOKEN
    _refused(call, token_target, security, grpc.StatusCode.UNAUTHENTICATED, says)


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("given", ["token", "token_file"])
def test_calls_with_the_token_are_served(given, call, pki, token_target, target):
    security = Security(token=TOKEN) if given == "token" else Security(token_file=pki.token)
    got = call(REQUEST, token_target, timeout=TIMEOUT, security=security)
    expected = call(REQUEST, target, timeout=TIMEOUT)
    if call is weightinit.fetch:
        got, expected = _raw(got["w"]), _raw(expected["w"])
    assert got == expected


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_token_with_mutual_tls(call, pki, locked_target):
    assert call(REQUEST, locked_target, timeout=TIMEOUT, security=_mtls(pki, token=TOKEN))
    _refused(call, locked_target, _mtls(pki), grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
    tls_only = Security(tls_ca=pki.ca_pem, token=TOKEN)
    says = "pass one from that CA: Security(tls_cert=..., tls_key=...)"
    _refused(call, locked_target, tls_only, UNAVAILABLE, says, "client_certificate")


ENV = {
    "tls_ca": "WEIGHTINIT_TLS_CA",
    "tls_cert": "WEIGHTINIT_CLIENT_TLS_CERT",
    "tls_key": "WEIGHTINIT_CLIENT_TLS_KEY",
    "tls_server_name": "WEIGHTINIT_TLS_SERVER_NAME",
    "token_file": "WEIGHTINIT_AUTH_TOKEN_FILE",
}


def test_from_env_reads_the_rust_clis_variables(pki, locked_target, monkeypatch):
    values = {
        "tls_ca": str(pki.ca_pem),
        "tls_cert": str(pki.client_pem),
        "tls_key": str(pki.client_key),
        "tls_server_name": "localhost",
        "token_file": str(pki.token),
    }
    for name, var in ENV.items():
        monkeypatch.setenv(var, values[name])
    security = Security.from_env()
    assert security == Security(**values)
    assert weightinit.digest(REQUEST, locked_target, timeout=TIMEOUT, security=security)


def test_from_env_without_variables_is_plaintext(monkeypatch):
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert Security.from_env() == Security()


def test_from_env_refuses_an_empty_variable(monkeypatch):
    """As the CLI does: an empty WEIGHTINIT_TLS_CA read as unset would mean plaintext."""
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WEIGHTINIT_TLS_CA", "")
    with pytest.raises(ValueError, match="WEIGHTINIT_TLS_CA set but empty"):
        Security.from_env()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tls_ca": ""}, "tls_ca is empty"),
        ({"tls_ca": "ca.pem", "tls_server_name": ""}, "tls_server_name is empty"),
        ({"token": TOKEN, "token_file": "token"}, "pass one"),
    ],
)
def test_options_that_cannot_work_are_refused_on_construction(options, message):
    with pytest.raises(ValueError, match=message):
        Security(**options)


@pytest.mark.parametrize(
    "options, field, message",
    [
        ({"tls_ca": "ca.pem", "tls_cert": "client.pem"}, "tls_key", "tls_cert and tls_key go"),
        ({"tls_ca": "ca.pem", "tls_key": "client.key"}, "tls_cert", "tls_cert and tls_key go"),
        ({"tls_cert": "client.pem", "tls_key": "client.key"}, "tls_cert", "need tls_ca"),
        ({"tls_server_name": "localhost"}, "tls_server_name", "need tls_ca"),
        ({"token": ""}, "token", "token: the token is empty"),
        ({"token": " \n"}, "token", "token: the token is empty"),
        ({"token": "two words"}, "token", "visible ASCII"),
        ({"token": "jeton-\u00e9t\u00e9"}, "token", "visible ASCII"),
        ({"token": "x" * 4097}, "token", "visible ASCII"),
    ],
)
def test_options_that_cannot_work_are_refused_before_dialing(
    options, field, message, pki, listener
):
    files = {"tls_ca", "tls_cert", "tls_key"}
    options = {name: pki.dir / v if name in files else v for name, v in options.items()}
    with pytest.raises(InvalidOption, match=message) as raised:
        weightinit.Client(listener(), security=Security(**options))
    assert raised.value.field == field


def test_options_of_the_wrong_type_are_refused_on_construction():
    with pytest.raises(TypeError, match="tls_ca cannot be a int"):
        Security(tls_ca=42)
    with pytest.raises(TypeError, match="token is a str, not bytes"):
        Security(token=TOKEN.encode())


@pytest.fixture
def listener():
    """A function that returns the address of a socket that listens, and afterwards checks
    that nothing connected to it: what a refused option must not do."""
    sockets = []

    def listen():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        sockets.append(sock)
        return f"127.0.0.1:{sock.getsockname()[1]}"

    yield listen
    for sock in sockets:
        with sock, pytest.raises(BlockingIOError):
            sock.accept()[0].close()


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "files, message",
    [
        ({"tls_ca": "missing.pem"}, "tls_ca: cannot read .*missing.pem: No such file"),
        ({"tls_ca": "ca.key"}, "tls_ca: no PEM certificate in .*ca.key"),
        ({"tls_ca": b"not a PEM"}, "tls_ca: no PEM certificate in the bytes given"),
        (
            {"tls_ca": "ca.pem", "tls_cert": "client.key", "tls_key": "client.key"},
            "tls_cert: no PEM certificate in .*client.key",
        ),
        (
            {"tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.pem"},
            "tls_key: no PEM private key in .*client.pem",
        ),
        ({"token_file": "missing-token"}, "token_file: cannot read"),
        ({"token_file": "empty-token"}, "the token in .*empty-token is empty"),
        ({"token_file": "spaced-token"}, "visible ASCII"),
        ({"token_file": "latin1-token"}, "visible ASCII"),
    ],
)
def test_unusable_files_are_refused_before_dialing(call, files, message, pki, listener):
    (pki.dir / "empty-token").write_text("\n")
    (pki.dir / "spaced-token").write_text("two words\n")
    (pki.dir / "latin1-token").write_bytes(b"jeton-\xe9t\xe9\n")
    security = Security(
        **{name: v if isinstance(v, bytes) else pki.dir / v for name, v in files.items()}
    )
    with pytest.raises(InvalidOption, match=message) as raised:
        call(REQUEST, listener(), timeout=TIMEOUT, security=security)
    # The option at fault, named first.
    assert raised.value.field in files and str(raised.value).startswith(f"{raised.value.field}: ")


def test_repr_hides_the_token():
    assert TOKEN not in repr(Security(token=TOKEN))


def test_init_module_with_security(pki, locked_target, target):
    torch = pytest.importorskip("torch")
    import weightinit.torch as wt

    security = _mtls(pki, token=TOKEN)
    model = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.LayerNorm(8))
    wt.init_module(model, 11, locked_target, timeout=TIMEOUT, security=security)
    expected = weightinit.digest(wt.build_request(model, 11), target, timeout=TIMEOUT)
    assert {name: wt.tensor_digest(model.get_parameter(name)) for name in expected} == expected

    shards = wt.init_module(
        model, 11, locked_target, rank=1, world_size=2, timeout=TIMEOUT, security=security
    )
    assert torch.equal(shards["0.weight"], model[0].weight.detach()[4:])
    with pytest.raises(grpc.RpcError) as raised:
        wt.init_module(model, 11, locked_target, timeout=TIMEOUT, security=_mtls(pki))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
