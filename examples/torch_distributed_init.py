#!/usr/bin/env python3
"""Two CPU ranks initialize the same model from a weightinit server and prove they agree.

    python examples/torch_distributed_init.py --target 127.0.0.1:50051

Needs the Python client with torch: pip install "./clients/python[torch]".

torch.multiprocessing.spawn starts the ranks; they join a torch.distributed process group (gloo,
over 127.0.0.1). Each rank seeds torch's own RNG differently, so without the service their
parameters would differ, then initializes the model through weightinit.torch.init_module().
Each rank hashes every parameter (BLAKE3) and the ranks all-reduce the digest bytes with MAX and
with MIN: the two results are equal only if every rank holds exactly the same bytes. Rank 0 also
checks the digests against the server's own (the Digest RPC).
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import weightinit
import weightinit.torch as wt


def build_model():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 26 * 26, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def run(rank, world_size, port, target, seed):
    """One rank: initialize the model from the service, then compare digests with all ranks."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(1000 + rank)
        model = build_model()
        wt.init_module(model, seed, target)

        names = [name for name, _ in model.named_parameters()]
        hexes = [wt.tensor_digest(param) for param in model.parameters()]
        digests = torch.tensor([list(bytes.fromhex(h)) for h in hexes], dtype=torch.uint8)
        high, low = digests.clone(), digests.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        differing = [name for name, hi, lo in zip(names, high, low) if not torch.equal(hi, lo)]
        if differing:
            raise RuntimeError(f"rank {rank}: the ranks' parameters differ in {differing}")

        if rank == 0:
            server = weightinit.digest(wt.build_request(model, seed), target)
            if server != dict(zip(names, hexes)):
                raise RuntimeError("the parameters do not match the server's digests")
            values = sum(param.numel() for param in model.parameters())
            print(
                f"{world_size} ranks agree on all {len(names)} parameters ({values} values), "
                f"and they match the server's digests"
            )
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the weightinit server, host:port")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    # gloo over the loopback interface only, whatever the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        run, args=(args.world_size, free_port(), args.target, args.seed), nprocs=args.world_size
    )


if __name__ == "__main__":
    main()
