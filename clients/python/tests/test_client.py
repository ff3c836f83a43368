"""weightinit.Client: one channel per target, reused, with a default deadline; the module-level
calls share one per target and Security and pick up a renewed token file."""

import socket

import grpc
import pytest
from conftest import serve

import weightinit
from weightinit import client as client_module

REQUEST = {"seed": 5, "tensors": [{"name": "w", "shape": [4, 3], "init": {"xavierUniform": {}}}]}
TOKEN = "s3cret-token-for-the-client-tests"


@pytest.fixture
def channels(monkeypatch):
    """Counts the channels opened (each still a real one)."""
    opened = []
    real = grpc.insecure_channel

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", counting)
    return opened


def test_module_level_calls_share_one_channel_per_target(target, channels):
    first = weightinit.fetch(REQUEST, target)
    digests = weightinit.digest(REQUEST, target)
    described = weightinit.describe(REQUEST, target)
    again = weightinit.fetch(REQUEST, target)
    assert channels.count(target) <= 1  # none if an earlier test made the shared one
    assert (first["w"] == again["w"]).all() and described["w"]["outputShape"] == ["4", "3"]
    assert set(digests) == {"w"}


def test_a_client_reuses_its_channel_and_closes_it(target, channels):
    with weightinit.Client(target) as client:
        arrays = client.fetch(REQUEST)
        assert client.digest(REQUEST)["w"] == weightinit.digest(REQUEST, target)["w"]
        assert client.describe(REQUEST)["w"]["shape"] == ["4", "3"]
        assert (client.fetch(REQUEST)["w"] == arrays["w"]).all()
    assert channels.count(target) <= 2  # this client's, and maybe the shared one's
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
    assert client_module.DEFAULT_TIMEOUT is not None


@pytest.mark.parametrize("timeout", [0, -1])
def test_client_arguments_are_checked(timeout):
    with pytest.raises(ValueError, match="timeout"):
        weightinit.Client("127.0.0.1:1", timeout=timeout)
    with pytest.raises(ValueError, match="target"):
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
        mine.write_text(TOKEN)  # another length: the file's size changes as well as its time
        assert set(weightinit.digest(REQUEST, locked, security=security)) == {"w"}
