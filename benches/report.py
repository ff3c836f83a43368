"""Turns the JSON lines of one benchmark run into the markdown report with the ratios.

    python benches/report.py RESULTS.jsonl MACHINE.json

Prints markdown on stdout: the machine and load, each figure, every ratio, and each target
of issue 4 with its verdict.
"""

import json
import sys

MIB = 1 << 20


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def main():
    rows = load(sys.argv[1])
    with open(sys.argv[2]) as f:
        machine = json.load(f)
    cores = machine["cores"]
    out = []
    p = out.append
    p(f"- Machine: {machine['model']}, {cores} cores, {machine['memory']}")
    p(f"- Date: {machine['date']}; commit {machine['commit']}")
    p(
        f"- Load average (1/5/15 min) before: {machine['load_before']}; after: {machine.get('load_after', '?')}"
    )
    p(
        "- Each figure is the best of 5 runs (median beside it where shown); other work on the"
    )
    p("  machine only ever slows a run down.")
    p("")
    p("### Ceiling")
    p("| what | 1 thread | all cores | per CPU-second (1 thread) |")
    p("|---|---|---|---|")
    ceiling = {}
    for bench in ["keystream", "blake3"]:
        cells = []
        for threads in [1, cores]:
            row = find(rows, bench=bench, threads=threads)
            ceiling[(bench, threads)] = row["bytes_per_s"] if row else None
            cells.append(f"{row['bytes_per_s'] / 1e9:.2f} GB/s" if row else "-")
        row = find(rows, bench=bench, threads=1)
        ceiling[(bench, "cpu")] = row["bytes_per_cpu_s"] if row else None
        cells.append(f"{row['bytes_per_cpu_s'] / 1e9:.2f} GB/s" if row else "-")
        p(
            f"| {'ChaCha8 keystream' if bench == 'keystream' else 'BLAKE3'} | "
            + " | ".join(cells)
            + " |"
        )
    p("")
    p(
        "### Engine (elements/s; fraction of the keystream ceiling at 8 bytes per element)"
    )
    p(
        "| distribution | dtype | 1 thread | of ceiling | all cores | of ceiling | per CPU-second | of ceiling |"
    )
    p("|---|---|---|---|---|---|---|---|")
    for distribution in ["uniform", "normal", "truncated_normal"]:
        for dtype in ["DTYPE_FLOAT32", "DTYPE_BFLOAT16"]:
            cells = []
            for threads in [1, cores, "cpu"]:
                row = find(
                    rows,
                    bench="engine",
                    distribution=distribution,
                    dtype=dtype,
                    threads=1 if threads == "cpu" else threads,
                )
                ks = ceiling[("keystream", threads)]
                rate = (
                    row
                    and row[
                        "elements_per_cpu_s" if threads == "cpu" else "elements_per_s"
                    ]
                )
                if row and ks:
                    cells += [f"{rate / 1e6:.0f} M/s", f"{rate * 8 / ks:.0%}"]
                else:
                    cells += ["-", "-"]
            p(f"| {distribution} | {dtype[6:].lower()} | " + " | ".join(cells) + " |")
    p("")
    orthogonal = [row for row in rows if row["bench"] == "orthogonal"]
    if orthogonal:
        p("### orthogonal: the whole matrix before the first element (all cores)")
        p("| shape | seconds |")
        p("|---|---|")
        for row in orthogonal:
            p(f"| [{row['n']}, {row['n']}] | {row['seconds']:.2f} |")
        p("")
    p("### Peers, [8192, 8192] (64 Mi elements)")
    p("| peer | dtype | threads | best | median | elements/s | CPU time |")
    p("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["bench"] in ("torch", "numpy"):
            name = (
                f"torch.nn.init.{row['init']}"
                if row["bench"] == "torch"
                else f"numpy Generator.{row['method']}"
            )
            p(
                f"| {name} | {row['dtype']} | {row['threads']} | {row['best_s']:.3f} s | {row['median_s']:.3f} s "
                f"| {row['elements'] / row['best_s'] / 1e6:.0f} M/s | {row['cpu_s']:.3f} s |"
            )
    p("")
    p("### Service, [8192, 8192] float32 (256 MiB)")
    p("| what | best | median | throughput | server CPU time |")
    p("|---|---|---|---|---|")
    for row in rows:
        if row["bench"] in ("digest", "generate_rust", "generate_python"):
            what = {
                "digest": f"Digest RPC, {row['scheme']}",
                "generate_rust": f"Generate into a Rust client (8/16 MiB windows), {row['scheme']}",
                "generate_python": f"Generate into Python grpcio + numpy, {row['scheme']}",
            }[row["bench"]]
            cpu = f"{row['server_cpu_s']:.3f} s" if "server_cpu_s" in row else "-"
            p(
                f"| {what} | {row['best_s']:.3f} s | {row['median_s']:.3f} s | "
                f"{row['bytes'] / row['best_s'] / 1e9:.2f} GB/s | {cpu} |"
            )
    permutes = [row for row in rows if row["bench"] == "permute"]
    if permutes:
        p("")
        p(
            "### Permuted views: Digest and Generate of a tensor and of its Keras-layout view, "
            "run alternately"
        )
        p(
            "| rpc | shape | permute | plain best | permuted best | ratio (target >= 70%) | "
            "CPU time ratio |"
        )
        p("|---|---|---|---|---|---|---|")
        for row in permutes:
            cpu = (
                row["plain_cpu_s"] / row["permuted_cpu_s"]
                if row.get("permuted_cpu_s")
                else float("nan")
            )
            p(
                f"| {row.get('rpc', 'digest')} | {row['shape']} f32 | {row['permute']} | "
                f"{row['plain_best_s']:.4f} s | "
                f"{row['permuted_best_s']:.4f} s | {row['ratio']:.0%} | {cpu:.0%} |"
            )
    memory = find(rows, bench="memory")
    if memory:
        p("")
        p(
            f"Server memory while streaming 4 GiB (xavier_uniform f32, [32768, 32768]) to a client that drops the data: "
            f"peak RSS (VmHWM) {memory['peak_rss'] / MIB:.0f} MiB (idle before: {memory['idle_peak_rss'] / MIB:.0f} MiB); "
            f"{memory['bytes'] / memory['seconds'] / 1e9:.2f} GB/s."
        )
    p("")
    p("### Small requests ([4, 4] tensor; each client on its own connection)")
    p("| RPC | clients | requests/s | p50 | p99 |")
    p("|---|---|---|---|---|")
    for row in rows:
        if row["bench"] == "latency":
            p(
                f"| {row['rpc'].capitalize()} | {row['concurrency']} | {row['requests_per_s']:.0f} | "
                f"{row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms |"
            )
    sweep = [row for row in rows if row["bench"] == "sweep"]
    if sweep:
        p("")
        p(
            "### Generate into the Rust client by chunk size and HTTP/2 windows (GB/s, best of 5)"
        )
        p(
            "| server window flags | client receive window | 256 KiB | 1 MiB | 4 MiB - 64 KiB |"
        )
        p("|---|---|---|---|---|")
        keys = []
        for row in sweep:
            key = (row["server_window"], row["client_window"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            cells = []
            for chunk in [256 << 10, 1 << 20, (4 << 20) - (64 << 10)]:
                row = find(
                    sweep, server_window=key[0], client_window=key[1], chunk_bytes=chunk
                )
                cells.append(
                    f"{row['bytes'] / row['best_s'] / 1e9:.2f}" if row else "-"
                )
            p(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    p("")
    p("### Targets (ratios from this run)")
    p(
        "Verdicts use the wall-clock figures. The CPU-time column compares the CPU seconds each"
    )
    p(
        "side used (the server's process, torch's process), which other load on the machine"
    )
    p("does not distort.")
    p("")
    p("| target | wall clock | CPU time | verdict |")
    p("|---|---|---|---|")

    def target(name, value, goal, text, cpu_text="-"):
        if value is None:
            p(f"| {name} | not measured | - | - |")
        else:
            p(
                f"| {name} | {text} | {cpu_text} | {'met' if value >= goal else 'NOT met'} |"
            )

    def ratio(ours, theirs):
        return theirs["best_s"] / ours["best_s"] if ours and theirs else None

    for scheme, init, goal in [
        ("xavier_uniform", "xavier_uniform_", 3.0),
        ("xavier_normal", "xavier_normal_", 2.5),
    ]:
        ours, theirs = (
            find(rows, bench="digest", scheme=scheme),
            find(rows, bench="torch", init=init, dtype="float32"),
        )
        r = ratio(ours, theirs)
        cpu = (
            f"{theirs['cpu_s'] / ours['server_cpu_s']:.2f}x"
            if ours and theirs and ours.get("server_cpu_s")
            else "-"
        )
        target(
            f"Digest {scheme} f32 >= {goal}x torch.nn.init.{init}",
            r,
            goal,
            f"{r:.2f}x" if r else "",
            cpu,
        )
    uniform = find(
        rows, bench="engine", distribution="uniform", dtype="DTYPE_FLOAT32", threads=1
    )
    ks, ks_cpu = ceiling[("keystream", 1)], ceiling[("keystream", "cpu")]
    frac = uniform["elements_per_s"] * 8 / ks if uniform and ks else None
    frac_cpu = (
        f"{uniform['elements_per_cpu_s'] * 8 / ks_cpu:.0%}"
        if uniform and ks_cpu
        else "-"
    )
    target(
        "1 worker uniform f32 >= 85% of the 1-core keystream",
        frac,
        0.85,
        f"{frac:.0%}" if frac else "",
        frac_cpu,
    )
    r = ratio(
        find(rows, bench="generate_python"),
        find(rows, bench="torch", init="xavier_uniform_", dtype="float32"),
    )
    target(
        "Python grpcio into numpy >= torch xavier_uniform_ locally",
        r,
        1.0,
        f"{r:.2f}x" if r else "",
    )
    if memory:
        mib = memory["peak_rss"] / MIB
        target(
            "server RSS < 256 MiB streaming 4 GiB", 256 - mib, 1e-9, f"{mib:.0f} MiB"
        )
    p("")
    p("### Other ratios")
    for scheme, init in [("truncated_normal", "trunc_normal_")]:
        r = ratio(
            find(rows, bench="digest", scheme=scheme),
            find(rows, bench="torch", init=init, dtype="float32"),
        )
        if r:
            p(
                f"- Digest truncated_normal (std 0.02) vs torch.nn.init.trunc_normal_ (std 0.02): {r:.2f}x"
            )
    for distribution, init, method in [
        ("uniform", "xavier_uniform_", "random"),
        ("normal", "xavier_normal_", "standard_normal"),
        ("truncated_normal", "trunc_normal_", None),
    ]:
        for dtype, torch_dtype in [
            ("DTYPE_FLOAT32", "float32"),
            ("DTYPE_BFLOAT16", "bfloat16"),
        ]:
            ours = find(
                rows,
                bench="engine",
                distribution=distribution,
                dtype=dtype,
                threads=cores,
            )
            theirs = find(rows, bench="torch", init=init, dtype=torch_dtype)
            if ours and theirs:
                rate = theirs["elements"] / theirs["best_s"]
                p(
                    f"- engine {distribution} {torch_dtype} on {cores} cores vs torch.nn.init.{init}: "
                    f"{ours['elements_per_s'] / rate:.2f}x"
                )
        numpy = find(rows, bench="numpy", method=method) if method else None
        ours = find(
            rows,
            bench="engine",
            distribution=distribution,
            dtype="DTYPE_FLOAT32",
            threads=1,
        )
        if numpy and ours:
            p(
                f"- engine {distribution} f32 on 1 thread vs numpy Generator.{method} (1 thread): "
                f"{ours['elements_per_s'] / (numpy['elements'] / numpy['best_s']):.2f}x"
            )
    # The ceiling arithmetic for Digest: every element costs 8 keystream bytes and its output
    # bytes of BLAKE3, on the same cores (per-CPU-second rates, spread over all cores).
    ks_cpu, b3_cpu = ceiling[("keystream", "cpu")], ceiling[("blake3", "cpu")]
    if ks_cpu and b3_cpu:
        floor = ((1 << 26) * 8 / ks_cpu + (1 << 28) / b3_cpu) / cores
        p(
            f"- Floor for a Digest of 64 Mi f32 elements on {cores} free cores (keystream + BLAKE3 only, "
            f"nothing else): {floor:.3f} s"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
