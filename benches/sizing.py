"""The per-core rates behind the README's sizing table, measured side by side in one run.

    WEIGHTINIT_BIN=target/release/weightinit python benches/sizing.py

On a [8192, 8192] tensor (64 Mi elements), best of 3 each, in bfloat16 and float32, for the
two draws that matter for sizing: normal(0, 0.02) (transformers' init of every matrix, the
engine's slowest distribution) and torchDefault (PyTorch's Linear default, uniform):
- local: weightinit.fetch(..., "local", out=) in this process on all cores; the rate per
  core-second is elements over this process's CPU time;
- digest: the server with --workers 1 making and hashing the tensor without sending it (one
  core of a replica);
- loopback: Generate from a server with all workers into this process (Rust receive, BLAKE3
  checked), with the server's CPU time (from /proc) and this process's;
- torch: torch.nn.init.normal_ / kaiming_uniform_ on the same tensor, in this process;
- checkpoint: safetensors' load_file of the same tensor saved once, copied into a tensor, from
  the page cache (the best case of reading a checkpoint; a real file system is slower).
Prints one line per measurement and the sizing table (markdown) computed from the rates.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import weightinit
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3
SHAPE = [8192, 8192]
ELEMENTS = SHAPE[0] * SHAPE[1]
TICK = os.sysconf("SC_CLK_TCK")
DRAWS = {"normal": {"normal": {"std": 0.02}}, "uniform": {"torchDefault": {}}}
DTYPES = {
    "bfloat16": (torch.bfloat16, np.uint16),
    "float32": (torch.float32, np.float32),
}
MODELS = {"1B": 1e9, "7B": 7e9, "70B": 70e9}


def server(*flags):
    binary = Path(
        os.environ.get("WEIGHTINIT_BIN", REPO / "target" / "release" / "weightinit")
    )
    process = subprocess.Popen(
        [str(binary), "serve", "--addr", "127.0.0.1:0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    match = re.search(r"listening on (127\.0\.0\.1:\d+)", process.stdout.readline())
    if match is None:
        process.kill()
        sys.exit(f"{binary} did not print its listening line")
    return process, match.group(1)


def server_cpu(process):
    """CPU seconds the server process has used (user + system), from /proc."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def best(run, *args, served_by=None, **kwargs):
    """(wall, this process's CPU, the server's CPU) of the fastest of REPEATS calls of
    run(*args, **kwargs), in seconds; the server's CPU is that of the process `served_by`."""
    runs = []
    for _ in range(REPEATS):
        cpu, wall = time.process_time(), time.perf_counter()
        before = server_cpu(served_by) if served_by else 0.0
        run(*args, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        served = server_cpu(served_by) - before if served_by else 0.0
        runs.append((wall, cpu, served))
    return min(runs)


def load_into(tensor, path):
    """Reads a checkpoint into `tensor`: load_file maps the file, the copy reads it."""
    tensor.copy_(load_file(path)["w"])


def line(label, wall, cpu=None, per_core=None):
    text = f"{label:<46} {wall:7.3f} s  {ELEMENTS / wall / 1e6:7.0f} M elements/s"
    if cpu is not None:
        text += f"  (CPU {cpu:6.3f} s"
        text += f", {per_core / 1e6:5.0f} M/core-s)" if per_core else ")"
    print(text, flush=True)


def main():
    one, one_address = server("--workers", "1")
    full, address = server()
    rates = {}
    try:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
        )
        for dtype_name, (torch_dtype, numpy_dtype) in DTYPES.items():
            size = torch.empty((), dtype=torch_dtype).element_size()
            out = np.empty(SHAPE, numpy_dtype)
            tensor = torch.empty(SHAPE, dtype=torch_dtype)
            for draw, init in DRAWS.items():
                print(
                    f"{dtype_name} {draw} [8192, 8192] ({ELEMENTS * size / 2**20:.0f} MiB)"
                )
                spec = {"name": "w", "shape": SHAPE, "init": init}
                request = {
                    "seed": 1,
                    "dtype": f"DTYPE_{dtype_name.upper()}",
                    "tensors": [spec],
                }
                if draw == "normal":
                    wall, cpu, _ = best(torch.nn.init.normal_, tensor, std=0.02)
                else:
                    wall, cpu, _ = best(
                        torch.nn.init.kaiming_uniform_, tensor, a=5**0.5
                    )
                line("  torch init", wall, cpu)
                wall, cpu, _ = best(weightinit.fetch, request, "local", out={"w": out})
                local = ELEMENTS / cpu
                line("  local (all cores)", wall, cpu, local)
                wall, _, served = best(
                    weightinit.digest, request, one_address, served_by=one
                )
                digest = ELEMENTS / served
                line("  digest, server --workers 1", wall, served, digest)
                wall, cpu, served = best(
                    weightinit.fetch, request, address, out={"w": out}, served_by=full
                )
                line("  loopback Generate: server CPU", wall, served, ELEMENTS / served)
                line("  loopback Generate: client CPU", wall, cpu, ELEMENTS / cpu)
                rates[dtype_name, draw] = {
                    "bytes": size,
                    "local": local,
                    "digest": digest,
                    "serve": ELEMENTS / served,
                    "receive": ELEMENTS / cpu,
                    "loopback_wall": ELEMENTS / wall,
                }
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "w.safetensors")
                save_file({"w": tensor}, path)
                wall, cpu, _ = best(load_into, tensor, path)
                line(f"  checkpoint load_file {dtype_name} (page cache)", wall, cpu)
                rates[dtype_name, "checkpoint"] = ELEMENTS * size / wall
    finally:
        for process in (one, full):
            process.terminate()
            process.wait()
    table(rates)


def table(rates):
    """The sizing tables (markdown) from the bfloat16 normal(0, 0.02) rates per core-second."""
    r = rates["bfloat16", "normal"]
    size = r["bytes"]
    cores, replica_cores = 8, 16
    print(f'\nIn-process ("local"), bfloat16 normal(0, 0.02), {cores} cores per rank:')
    print(
        "| model | bytes | CPU to make it | 1 rank (whole model) | 8 ranks | 64 ranks | 512 ranks |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, params in MODELS.items():
        core_seconds = params / r["local"]
        per_rank = [core_seconds / (ranks * cores) for ranks in (1, 8, 64, 512)]
        print(
            f"| {name} | {params * size / 1e9:.0f} GB | {core_seconds:,.0f} core-s | "
            + " | ".join(f"{t:,.2f} s" for t in per_rank)
            + " |"
        )
    replica = replica_cores * r["serve"] * size / 1e9
    print(
        f"\nThe service, each byte served once (FSDP/TP shards): a {replica_cores}-core replica "
        f"makes {replica:.1f} GB/s; behind a 25 GbE link (3.1 GB/s) the link bounds it"
    )
    print(
        "| model | server CPU | 1 replica, 25 GbE | 4 replicas | ranks' CPU to receive |"
    )
    print("|---|---|---|---|---|")
    for name, params in MODELS.items():
        data = params * size / 1e9
        times = [data / min(k * replica, k * 3.125) for k in (1, 4)]
        print(
            f"| {name} | {params / r['serve']:,.0f} core-s | "
            + " | ".join(f"{t:,.1f} s" for t in times)
            + f" | {params / r['receive']:,.0f} core-s |"
        )


if __name__ == "__main__":
    main()
