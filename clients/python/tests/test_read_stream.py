"""read_stream() on hand-made Generate streams: assembly, buffers and every integrity check."""

import importlib.util

import blake3
import numpy as np
import pytest
from weightinit.v1 import weightinit_pb2 as pb

from weightinit import IntegrityError, read_stream, to_message

DTYPES = {
    "<f4": pb.DTYPE_FLOAT32,
    "<f8": pb.DTYPE_FLOAT64,
    "<f2": pb.DTYPE_FLOAT16,
    "<u2": pb.DTYPE_BFLOAT16,
}


def _request(arrays):
    return {
        "seed": 1,
        "tensors": [
            {"name": name, "shape": list(a.shape), "init": {"zeros": {}}}
            for name, a in arrays.items()
        ],
    }


def _stream(arrays, chunk_bytes=6):
    """A well-formed stream sending `arrays` ({name: ndarray}) in `chunk_bytes` pieces."""
    responses = []
    for index, (name, array) in enumerate(arrays.items()):
        data = array.tobytes()
        responses.append(
            pb.GenerateResponse(
                header=pb.TensorHeader(
                    index=index,
                    name=name,
                    shape=array.shape,
                    output_shape=array.shape,
                    dtype=DTYPES[array.dtype.str],
                    byte_length=len(data),
                    algorithm=1,
                )
            )
        )
        for offset in range(0, len(data), chunk_bytes):
            chunk = pb.Chunk(
                tensor_index=index, offset=offset, data=data[offset : offset + chunk_bytes]
            )
            responses.append(pb.GenerateResponse(chunk=chunk))
        end = pb.TensorEnd(
            tensor_index=index, blake3=blake3.blake3(data).digest(), byte_length=len(data)
        )
        responses.append(pb.GenerateResponse(end=end))
    return responses


ARRAYS = {
    "w": np.arange(15, dtype="<f4").reshape(3, 5) / 7,
    "scalar": np.array(2.5, dtype="<f8"),
    "half": np.array([1, -2, 0.5, 65504], dtype="<f2"),
    "empty": np.zeros((0, 4), dtype="<f4"),
}


def test_assembles_every_tensor_with_its_shape_and_dtype():
    result = read_stream(_stream(ARRAYS), _request(ARRAYS))
    assert list(result) == list(ARRAYS)
    for name, expected in ARRAYS.items():
        assert result[name].dtype == expected.dtype and result[name].shape == expected.shape
        assert result[name].tobytes() == expected.tobytes()


def test_accepts_a_message_as_the_request():
    message = to_message(_request(ARRAYS))
    assert list(read_stream(_stream(ARRAYS), message)) == list(ARRAYS)


def test_to_message_rejects_other_types():
    with pytest.raises(TypeError):
        to_message([("seed", 1)])


def test_writes_into_caller_buffers_in_place():
    array = np.zeros((3, 5), dtype="<f4")
    raw = bytearray(8)
    result = read_stream(_stream(ARRAYS), _request(ARRAYS), out={"w": array, "scalar": raw})
    assert result["w"] is array and result["scalar"] is raw
    assert array.tobytes() == ARRAYS["w"].tobytes()
    assert bytes(raw) == ARRAYS["scalar"].tobytes()


@pytest.mark.parametrize(
    "out, error",
    [
        ({"w": np.zeros(14, dtype="<f4")}, ValueError),
        ({"w": np.zeros(15, dtype="<f4")[::-1]}, ValueError),
        ({"w": bytes(60)}, ValueError),
        ({"w": [0.0] * 15}, TypeError),
        ({"nope": bytearray(4)}, ValueError),
    ],
    ids=["wrong-size", "not-contiguous", "read-only", "not-a-buffer", "unknown-name"],
)
def test_rejects_unusable_buffers(out, error):
    with pytest.raises(error):
        read_stream(_stream(ARRAYS), _request(ARRAYS), out=out)


def _corrupt(responses, kind, change):
    """The stream with `change` applied to the first response of `kind` (removed if None)."""
    for i, response in enumerate(responses):
        if response.WhichOneof("item") == kind:
            if change is None:
                return responses[:i] + responses[i + 1 :]
            change(getattr(response, kind))
            return responses
    raise AssertionError(f"no {kind} in the stream")


def _flip_first_byte(chunk):
    chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("chunk", _flip_first_byte, "BLAKE3"),
        ("end", lambda end: setattr(end, "blake3", bytes(32)), "BLAKE3"),
        ("chunk", None, "offset"),
        ("chunk", lambda chunk: setattr(chunk, "offset", 1), "offset"),
        ("chunk", lambda chunk: setattr(chunk, "tensor_index", 1), "chunk of tensor 1"),
        ("end", None, "no end"),
        ("end", lambda end: setattr(end, "byte_length", 59), "received"),
        ("header", lambda header: setattr(header, "name", "x"), "expected 0 'w'"),
        ("header", lambda header: header.output_shape.append(2), "byte_length"),
        ("header", lambda header: setattr(header, "dtype", pb.DTYPE_UNSPECIFIED), "dtype"),
        ("header", None, "no header"),
    ],
    ids=[
        "flipped-byte",
        "wrong-digest",
        "missing-chunk",
        "gap",
        "foreign-chunk",
        "missing-end",
        "short-end",
        "wrong-name",
        "shape-length-mismatch",
        "unknown-dtype",
        "missing-header",
    ],
)
def test_rejects_broken_streams(kind, change, message):
    with pytest.raises(IntegrityError, match=message):
        read_stream(_corrupt(_stream(ARRAYS), kind, change), _request(ARRAYS))


def test_rejects_chunks_past_the_byte_length():
    responses = _stream({"w": ARRAYS["w"]})
    extra = pb.Chunk(tensor_index=0, offset=60, data=b"\0\0\0\0")
    responses.insert(-1, pb.GenerateResponse(chunk=extra))
    with pytest.raises(IntegrityError, match="past"):
        read_stream(responses, _request({"w": ARRAYS["w"]}))


def test_rejects_a_stream_that_stops_early():
    responses = _stream(ARRAYS)
    with pytest.raises(IntegrityError, match="after 3 of 4"):
        read_stream(responses[:-1], _request(ARRAYS))


def test_rejects_tensors_beyond_the_request():
    with pytest.raises(IntegrityError, match="beyond"):
        read_stream(_stream(ARRAYS) + _stream({"w": ARRAYS["w"]}), _request(ARRAYS))


BF16_BITS = np.array([0x3F80, 0xC000, 0x3E00], dtype="<u2")  # 1.0, -2.0, 0.125


def test_bfloat16_without_torch_is_raw_bits(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else find_spec(name, *a),
    )
    result = read_stream(_stream({"b": BF16_BITS}), _request({"b": BF16_BITS}))["b"]
    assert isinstance(result, np.ndarray) and result.dtype == np.uint16
    assert result.tolist() == BF16_BITS.tolist()


def test_bfloat16_with_torch_is_a_bfloat16_tensor():
    torch = pytest.importorskip("torch")
    result = read_stream(_stream({"b": BF16_BITS}), _request({"b": BF16_BITS}))["b"]
    assert result.dtype == torch.bfloat16
    assert result.tolist() == [1.0, -2.0, 0.125]
