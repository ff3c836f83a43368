"""Generate into a Python grpcio client, written into a preallocated numpy buffer.

Run by scripts/bench as `python benches/grpc_client.py ADDR`: streams the [8192, 8192]
float32 xavier_uniform tensor a few times and prints one JSON object with the best and median
seconds, from the request to the last byte in the numpy array.
"""

import json
import os
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "clients", "python", "weightinit", "_proto"))
from weightinit.v1 import weightinit_pb2 as pb  # noqa: E402

REPEATS = 5
SHAPE = (8192, 8192)


def generate(channel, request):
    call = channel.unary_stream(
        "/weightinit.v1.WeightInit/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    start = time.perf_counter()
    out = None
    view = None
    for message in call(request):
        kind = message.WhichOneof("item")
        if kind == "chunk":
            data = message.chunk.data
            view[message.chunk.offset:message.chunk.offset + len(data)] = data
        elif kind == "header":
            out = np.empty(SHAPE, dtype=np.float32)
            view = memoryview(out.reshape(-1).view(np.uint8))
    return time.perf_counter() - start, out


def main():
    address = sys.argv[1]
    options = [("grpc.max_receive_message_length", 16 << 20)]
    request = pb.GenerateRequest(seed=1, tensors=[pb.TensorSpec(
        name="w", shape=list(SHAPE), init=pb.Init(xavier_uniform=pb.XavierUniform()))])
    with grpc.insecure_channel(address, options=options) as channel:
        times = sorted(generate(channel, request)[0] for _ in range(REPEATS))
    result = dict(bench="generate_python", scheme="xavier_uniform", shape=list(SHAPE),
                  bytes=SHAPE[0] * SHAPE[1] * 4, best_s=times[0], median_s=times[len(times) // 2])
    print(json.dumps(result), flush=True)
    print("  " + json.dumps(result), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
