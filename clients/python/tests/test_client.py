"""weightinit.Client: one channel per target, reused, with a default deadline; the module-level
calls share one per target and Security and pick up a renewed token file."""

import socket

import grpc
import pytest
from conftest import serve

import weightinit
from weightinit import _native
from weightinit import client as client_module

REQUEST = {"seed": 5, "tensors": [{"name": "w", "shape": [4, 3], "init": {"xavierUniform": {}}}]}
TOKEN = "s3cret-token-for-the-client-tests"


@pytest.fixture
def channels(monkeypatch):
    """Counts the channels opened: the native Remotes made (each still a real one), by target,
    with no shared Client left over from earlier tests."""
    opened = []
    real = _native.Remote

    def counting(target, **options):
        opened.append(target)
        return real(target, **options)

    monkeypatch.setattr(_native, "Remote", counting)
    monkeypatch.setattr(client_module, "_SHARED", {})
    return opened


def test_module_level_calls_share_one_channel_per_target(target, channels):
    first = weightinit.fetch(REQUEST, target)
    digests = weightinit.digest(REQUEST, target)
    described = weightinit.describe(REQUEST, target)
    again = weightinit.fetch(REQUEST, target)
    assert channels == [target]
    assert (first["w"] == again["w"]).all() and described["w"]["outputShape"] == ["4", "3"]
    assert set(digests) == {"w"}


def test_a_client_reuses_its_channel_and_closes_it(target, channels):
    with weightinit.Client(target) as client:
        arrays = client.fetch(REQUEST)
        assert client.digest(REQUEST)["w"] == weightinit.digest(REQUEST, target)["w"]
        assert client.describe(REQUEST)["w"]["shape"] == ["4", "3"]
        assert (client.fetch(REQUEST)["w"] == arrays["w"]).all()
    assert channels == [target, target]  # this client's, and the shared one's
    with pytest.raises(ValueError, match="[Cc]losed"):
        client.fetch(REQUEST)


def test_the_default_deadline_ends_a_call_to_a_server_that_never_answers():
    with socket.socket() as silent:  # accepts connections (backlog), never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with (
            weightinit.Client(address, timeout=0.5) as client,
            pytest.raises(grpc.RpcError) as raised,
        ):
            client.digest(REQUEST)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (
        raised.value.details() == f"the call to http://{address} did not finish within its timeout"
    )
    assert client_module.DEFAULT_TIMEOUT is not None


@pytest.mark.parametrize("timeout", [0, -1])
def test_client_arguments_are_checked(timeout):
    with pytest.raises(ValueError, match="timeout"):
        weightinit.Client("127.0.0.1:1", timeout=timeout)
    with pytest.raises(ValueError, match="retries: must be an int >= 0"):
        weightinit.Client("127.0.0.1:1", retries=-1)
    with pytest.raises(weightinit.InvalidOption, match='^target: "" is not a server address'):
        weightinit.Client("")


@pytest.mark.parametrize("seed", [-1, 2**64, "-3"])
def test_seeds_outside_u64_are_a_value_error_before_dialing(seed, channels):
    with pytest.raises(ValueError, match=r"seed: must be in 0\.\.2\*\*64-1, got"):
        weightinit.fetch({**REQUEST, "seed": seed}, "127.0.0.1:1")
    assert channels == []


def test_a_renewed_token_file_is_picked_up_by_the_next_call(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with serve(tmp_path / "stderr.log", "--auth-token-file", token_file) as locked:
        mine = tmp_path / "mine"
        mine.write_text("an-old-token")
        security = weightinit.Security(token_file=mine)
        with pytest.raises(grpc.RpcError) as raised:
            weightinit.digest(REQUEST, locked, security=security)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in raised.value.details()
        mine.write_text(TOKEN)  # another length: the file's size changes as well as its time
        assert set(weightinit.digest(REQUEST, locked, security=security)) == {"w"}


def test_a_grpc_client_that_compresses_its_requests_is_served(target):
    """grpcio with gzip, as any gRPC stack can be set up: the server takes the compressed
    request (it used to answer UNIMPLEMENTED) and answers as for an uncompressed one."""
    from weightinit.v1 import weightinit_pb2_grpc

    message = weightinit.to_message(REQUEST)
    with grpc.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        stub = weightinit_pb2_grpc.WeightInitStub(channel)
        digests = stub.Digest(message, timeout=30)
        headers = list(stub.Generate(message, timeout=30))
    assert [d.blake3.hex() for d in digests.digests] == [weightinit.digest(REQUEST, target)["w"]]
    assert [h.WhichOneof("item") for h in headers] == ["header", "chunk", "end"]


@pytest.mark.parametrize(
    ("call", "tensors"), [(weightinit.describe, 100_000), (weightinit.digest, 79_138)]
)
def test_describe_and_digest_answers_that_would_pass_4_mib_are_refused(call, tensors, target):
    """Their responses fit what gRPC clients receive by default, or the request is refused,
    naming the field and what to do; one tensor less fits for Digest."""
    request = {
        "seed": 1,
        "tensors": [{"name": f"t{i}", "shape": [2], "init": {"zeros": {}}} for i in range(tensors)],
    }
    with pytest.raises(weightinit.RequestRefused) as raised:
        call(request, target, timeout=60)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.field == "tensors"
    assert "(4 MiB) that gRPC clients receive by default; split the request" in str(raised.value)
    if call is weightinit.digest:
        request["tensors"].pop()
        assert len(call(request, target, timeout=60)) == tensors - 1
