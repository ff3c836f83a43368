"""The peers: initializing locally with PyTorch and NumPy on the benchmark's shapes.

Run by scripts/bench with the project's .venv python. Prints one JSON object per line: the
best and median of a few runs of torch.nn.init's xavier_uniform_, xavier_normal_ and
trunc_normal_ (CPU, torch's default thread count) on a preallocated [8192, 8192] tensor, and
NumPy's Generator (PCG64: random and standard_normal, float32) on the same shape. Each also
records the best CPU time of the process (all threads), comparable under load.
"""

import json
import sys
import time

import numpy as np
import torch

REPEATS = 5
SHAPE = (8192, 8192)


def timed(run):
    """Best and median wall seconds, and the best CPU seconds of all threads."""
    times, cpu = [], []
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    times.sort()
    return times[0], times[len(times) // 2], min(cpu)


def report(**fields):
    print(json.dumps(fields), flush=True)
    print("  " + json.dumps(fields), file=sys.stderr, flush=True)


def main():
    elements = SHAPE[0] * SHAPE[1]
    for dtype_name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        tensor = torch.empty(SHAPE, dtype=dtype)
        for name, init in [
            ("xavier_uniform_", torch.nn.init.xavier_uniform_),
            ("xavier_normal_", torch.nn.init.xavier_normal_),
            ("trunc_normal_", lambda t: torch.nn.init.trunc_normal_(t, std=0.02)),
        ]:
            init(tensor)  # warm up
            best, median, cpu = timed(lambda: init(tensor))
            report(
                bench="torch",
                init=name,
                dtype=dtype_name,
                elements=elements,
                threads=torch.get_num_threads(),
                best_s=best,
                median_s=median,
                cpu_s=cpu,
            )
    generator = np.random.default_rng(1)
    out = np.empty(SHAPE, dtype=np.float32)
    for name, run in [
        ("random", lambda: generator.random(out=out, dtype=np.float32)),
        (
            "standard_normal",
            lambda: generator.standard_normal(out=out, dtype=np.float32),
        ),
    ]:
        best, median, cpu = timed(run)
        report(
            bench="numpy",
            method=name,
            dtype="float32",
            elements=elements,
            threads=1,
            best_s=best,
            median_s=median,
            cpu_s=cpu,
        )


if __name__ == "__main__":
    main()
