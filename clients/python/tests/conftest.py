"""Shared fixtures: the real weightinit server, started once for the whole session.

The binary is $WEIGHTINIT_BIN, else target/release/weightinit, else target/debug/weightinit.
"""

import os
import re
import select
import subprocess
import threading
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def target(tmp_path_factory):
    """The address, 127.0.0.1:PORT, of a server started with `serve --addr 127.0.0.1:0`."""
    binary = _server_binary()
    if not binary.exists():
        pytest.fail(f"no server binary at {binary}: cargo build --release, or set WEIGHTINIT_BIN")
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            [str(binary), "serve", "--addr", "127.0.0.1:0"],
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
        yield match.group(1)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
