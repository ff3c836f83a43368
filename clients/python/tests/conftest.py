"""Shared fixtures: the real weightinit server, started once for the whole session, and serve()
to start more of them with other flags (TLS, tokens).

The binary is $WEIGHTINIT_BIN, else target/release/weightinit, else target/debug/weightinit.
"""

import os
import re
import select
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

# Before anything imports jax or keras: 8 fake CPU devices for the sharding tests, and JAX as
# Keras's backend (all test modules share one process).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

REPO = Path(__file__).resolve().parents[3]
_LISTENING = re.compile(r"weightinit listening on (127\.0\.0\.1:\d+)")


def _server_binary():
    if os.environ.get("WEIGHTINIT_BIN"):
        return Path(os.environ["WEIGHTINIT_BIN"])
    for profile in ("release", "debug"):
        path = REPO / "target" / profile / "weightinit"
        if path.exists():
            return path
    return REPO / "target" / "release" / "weightinit"


@contextmanager
def serve(log, *flags, addr="127.0.0.1:0", started=None):
    """Runs `serve --addr ADDR FLAGS...` with stderr going to `log`, and yields its address,
    127.0.0.1:PORT, read from the first line it prints. `started` (a list) gets the process."""
    binary = _server_binary()
    if not binary.exists():
        pytest.fail(f"no server binary at {binary}: cargo build --release, or set WEIGHTINIT_BIN")
    with open(log, "ab") as stderr:
        server = subprocess.Popen(
            [str(binary), "serve", "--addr", addr, *map(str, flags)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 30)
        line = server.stdout.readline() if ready else ""
        match = _LISTENING.fullmatch(line.rstrip("\n"))
        if match is None:
            pytest.fail(f"{binary} printed {line!r}, not its listening line (stderr: {log})")
        # Keep reading stdout so that the server can never block on a full pipe.
        threading.Thread(target=server.stdout.read, daemon=True).start()
        if started is not None:
            started.append(server)
        yield match.group(1)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def target(tmp_path_factory):
    """The address of a plaintext server started with `serve --addr 127.0.0.1:0`."""
    with serve(tmp_path_factory.mktemp("server") / "stderr.log") as address:
        yield address


@pytest.fixture(params=["local", "server"])
def both(request):
    """Each target in turn: "local" (the engine in this process) and the real server."""
    return "local" if request.param == "local" else request.getfixturevalue("target")
