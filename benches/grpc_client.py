"""Generate into a Python grpcio client, written into a preallocated numpy buffer.

Run by scripts/bench as `python benches/grpc_client.py ADDR`: streams the [8192, 8192]
float32 xavier_uniform tensor a few times and prints one JSON object with the best and median
seconds, from the request to the last byte in the numpy array.

Chunks are read from the raw message bytes (a GenerateResponse's wire format is a tag, a
length and the Chunk's three fields): the data then goes from grpcio's message straight into
the numpy buffer, one copy, where parsing it with protobuf first would copy it once more.
Headers and ends are parsed with the generated classes.
"""

import json
import os
import sys
import time

import grpc
import numpy as np

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(__file__), "..", "clients", "python", "weightinit", "_proto"
    ),
)
from weightinit.v1 import weightinit_pb2 as pb  # noqa: E402

REPEATS = 5
SHAPE = (8192, 8192)
CHUNK = 2  # GenerateResponse.chunk
DATA = 3  # Chunk.data


def varint(buffer, at):
    """The varint at `at` and the position after it."""
    value = shift = 0
    while True:
        byte = buffer[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def chunk_fields(raw):
    """(offset, start, end) of a chunk message's data within `raw`, or None if not a chunk."""
    key, at = varint(raw, 0)
    if key >> 3 != CHUNK:
        return None
    length, at = varint(raw, at)
    end, offset, start, stop = at + length, 0, 0, 0
    while at < end:
        key, at = varint(raw, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(raw, at)
            if field == 2:
                offset = value
        elif wire == 2:
            length, at = varint(raw, at)
            if field == DATA:
                start, stop = at, at + length
            at += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return offset, start, stop


def generate(channel, request):
    call = channel.unary_stream(
        "/weightinit.v1.WeightInit/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=None,  # raw bytes
    )
    start = time.perf_counter()
    out = np.empty(SHAPE, dtype=np.float32)
    view = memoryview(out.reshape(-1).view(np.uint8))
    received = 0
    for raw in call(request):
        fields = chunk_fields(raw)
        if fields is None:
            message = pb.GenerateResponse.FromString(raw)
            if message.WhichOneof("item") == "end":
                assert message.end.byte_length == received
            continue
        offset, begin, end = fields
        view[offset : offset + end - begin] = memoryview(raw)[begin:end]
        received += end - begin
    return time.perf_counter() - start, out


def main():
    address = sys.argv[1]
    options = [("grpc.max_receive_message_length", 16 << 20)]
    request = pb.GenerateRequest(
        seed=1,
        tensors=[
            pb.TensorSpec(
                name="w",
                shape=list(SHAPE),
                init=pb.Init(xavier_uniform=pb.XavierUniform()),
            )
        ],
    )
    with grpc.insecure_channel(address, options=options) as channel:
        times = sorted(generate(channel, request)[0] for _ in range(REPEATS))
    result = dict(
        bench="generate_python",
        scheme="xavier_uniform",
        shape=list(SHAPE),
        bytes=SHAPE[0] * SHAPE[1] * 4,
        best_s=times[0],
        median_s=times[len(times) // 2],
    )
    print(json.dumps(result), flush=True)
    print("  " + json.dumps(result), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
