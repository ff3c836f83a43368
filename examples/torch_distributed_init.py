#!/usr/bin/env python3
"""Two CPU ranks initialize an FSDP2-sharded model from a weightinit server and prove it is
the server's model.

    python examples/torch_distributed_init.py --target 127.0.0.1:50051

Needs the Python client with torch: pip install "./clients/python[torch]".

torch.multiprocessing.spawn starts the ranks; they join a torch.distributed process group (gloo,
over 127.0.0.1). Each rank builds the model on the meta device (no memory, no init), shards it
with FSDP2's fully_shard, materializes its shards with to_empty and fills them with
weightinit.torch.init_module(): each rank fetches only the rows it holds. Each rank seeds torch's
own RNG differently, so without the service the values would differ.

Then verify() proves it: every rank hashes (BLAKE3) the block of each parameter it holds,
compares it with what the request serves that rank, and the ranks all-gather the results.
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import weightinit.torch as wt
from weightinit._verify import verify


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
        with torch.device("meta"):
            model = build_model()
        for layer in model:
            if list(layer.parameters()):  # Conv2d, BatchNorm2d, the Linears
                fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        wt.init_module(model, seed, target)

        # Every rank hashes the block it holds and compares it with what the request serves
        # there; the ranks all-gather the results, so all of them pass or all raise
        # WeightsDiffer naming each differing parameter and its ranks.
        report = verify(model, seed, target)
        if rank == 0:
            values = sum(param.numel() for param in model.parameters())
            print(
                f"{world_size} ranks agree on all {len(report.names)} parameters and buffers "
                f"({values} parameter values, FSDP2-sharded): each holds exactly what "
                "init_module writes there"
            )
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", required=True, help="the weightinit server, host:port"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    # gloo over the loopback interface only, whatever the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        run,
        args=(args.world_size, free_port(), args.target, args.seed),
        nprocs=args.world_size,
    )


if __name__ == "__main__":
    main()
