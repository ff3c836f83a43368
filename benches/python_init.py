"""weightinit's Python package against torch's own init, side by side in one run.

    WEIGHTINIT_BIN=target/release/weightinit python benches/python_init.py

On a 317M-parameter Llama (transformers LlamaConfig: hidden 1024, 24 layers, intermediate
2048, vocab 32000), built on the meta device and materialized with to_empty, in float32 and
bfloat16, best of 3 each:
- torch: the baseline, transformers' own init of the model (`initialize_weights()`, what
  `init_weights()` runs: normal(0, 0.02) for every matrix, ones for the norms, the rotary
  frequencies);
- capture: `weightinit.torch.build_request(model, seed, init=...)`, the model's own init code
  run under weightinit's interception with nothing drawn or written: the cost of the
  interception itself;
- local: `weightinit.torch.init_module(model, seed, "local", init=...)` with the same init code,
  its draws served in this process and the rest replayed;
- loopback: the same over loopback from a release server this script starts.
Then a raw [8192, 8192] float32 xavier_uniform tensor into numpy (local and loopback) against
`torch.nn.init.xavier_uniform_`. Prints one line per measurement, the ratios against torch
(above 1 = faster than torch), and the peak RSS of this process against the model's size.
"""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import weightinit
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3
SEED = 42


def best(run, *args, **kwargs):
    """The best wall time of REPEATS calls of run(*args, **kwargs), in seconds."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama(dtype):
    config = LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2048,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    return model.to_empty(device="cpu")


def hf_init(model):
    """transformers' init_weights() of a model built on the meta device: its weight init, again
    (the flags that make it skip what it initialized before cleared)."""
    for tensor in (*model.modules(), *model.parameters(), *model.buffers()):
        tensor.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()


BASELINES = {"transformers": hf_init}


def server():
    binary = Path(
        os.environ.get("WEIGHTINIT_BIN", REPO / "target" / "release" / "weightinit")
    )
    process = subprocess.Popen(
        [str(binary), "serve", "--addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
    if match is None:
        process.kill()
        sys.exit(f"{binary} printed {line!r}, not its listening line")
    return process, match.group(1)


def report(name, seconds, baseline):
    print(f"{name:<44} {seconds:7.3f} s   {baseline / seconds:5.2f}x torch", flush=True)


def where(target):
    return "local" if target == weightinit.LOCAL else "loopback"


def llama_rows(dtype, address):
    """torch's init of the Llama against init_module in this process and over loopback."""
    model = llama(dtype)
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"Llama {params / 1e6:.0f}M parameters, {dtype}: {size:.0f} MiB")
    for name, init in BASELINES.items():
        baseline = best(init, model)
        report(f"  torch {name}", baseline, baseline)
        seconds = best(weightinit.torch.build_request, model, SEED, init=init)
        report(f"  capture (build_request, init={name})", seconds, baseline)
        for target in (weightinit.LOCAL, address):
            seconds = best(weightinit.torch.init_module, model, SEED, target, init=init)
            report(f"  init_module init={name} {where(target)}", seconds, baseline)
    print(f"  peak RSS so far {peak_rss_mib():.0f} MiB")


def stream_rows(address):
    """A raw [8192, 8192] float32 tensor into numpy against torch's xavier_uniform_."""
    shape = [8192, 8192]
    request = {
        "seed": SEED,
        "tensors": [{"name": "w", "shape": shape, "init": {"xavierUniform": {}}}],
    }
    tensor = torch.empty(shape)
    baseline = best(torch.nn.init.xavier_uniform_, tensor)
    print(f"[8192, 8192] float32 xavier_uniform ({tensor.nbytes / 2**20:.0f} MiB)")
    report("  torch.nn.init.xavier_uniform_", baseline, baseline)
    out = np.empty(shape, np.float32)
    for target in (weightinit.LOCAL, address):
        seconds = best(weightinit.fetch, request, target, out={"w": out})
        report(f"  fetch into numpy {where(target)}", seconds, baseline)


def main():
    process, address = server()
    threads = f"{torch.get_num_threads()} threads, {os.cpu_count()} cores"
    try:
        print(f"torch {torch.__version__}, {threads}")
        for dtype in (torch.float32, torch.bfloat16):
            llama_rows(dtype, address)
        stream_rows(address)
        print(f"peak RSS {peak_rss_mib():.0f} MiB")
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
