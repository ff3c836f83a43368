"""The committed gRPC stubs are what grpc_tools.protoc makes of the project's proto today."""

import importlib.util
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[1]
COMMITTED = CLIENT / "weightinit" / "_proto"


def _files(root):
    return {
        path.relative_to(root): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_stubs_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_stubs", CLIENT / "generate_stubs.py")
    generate_stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_stubs)
    generate_stubs.generate(tmp_path)

    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(committed) == sorted(fresh)
    stale = [str(path) for path in fresh if committed[path] != fresh[path]]
    assert not stale, f"stale stubs {stale}: run python clients/python/generate_stubs.py"


def test_stubs_import_as_the_proto_package():
    from weightinit.v1 import weightinit_pb2, weightinit_pb2_grpc

    assert weightinit_pb2.DESCRIPTOR.package == "weightinit.v1"
    assert weightinit_pb2_grpc.WeightInitStub
