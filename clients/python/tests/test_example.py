"""examples/torch_distributed_init.py runs against the real server."""

import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("torch")


def test_torch_distributed_example(target):
    example = REPO / "examples" / "torch_distributed_init.py"
    done = subprocess.run(
        [sys.executable, str(example), "--target", target],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "2 ranks agree on all 11 parameters and buffers" in done.stdout
