#!/usr/bin/env python3
"""Regenerates the committed gRPC stubs from the project's proto.

    python clients/python/generate_stubs.py            # rewrites weightinit/_proto
    python clients/python/generate_stubs.py OUT_DIR    # writes them elsewhere

Needs grpcio-tools at the version pinned in pyproject.toml (the `test` extra): the generated
files carry that version, and tests/test_stubs.py checks the committed ones are current.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / ".." / ".." / "proto"
PROTO_FILE = "weightinit/v1/weightinit.proto"
STUBS_DIR = HERE / "weightinit" / "_proto"


def generate(out_dir):
    """Writes weightinit/v1/weightinit_pb2{.py,.pyi,_grpc.py} under out_dir."""
    from grpc_tools import protoc

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO_FILE,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else STUBS_DIR)
