#!/usr/bin/env python3
"""Checks used by deploy/ci-docker.sh and deploy/ci-compose.sh.

  vectors     call Digest for every case of tests/data/vectors-v1.json through
              grpcurl and compare each tensor's BLAKE3 and byte length
  stream      read `grpcurl ... Generate` output on stdin (streaming, optionally
              throttled so the stream lasts a while) and verify that the chunks
              are contiguous and hash to the digest in each tensor's end message
  safetensors verify a file written by `weightinit fetch` against the vectors
              (one case) or print its per-tensor digests
  k8s-policy  rules the schemas cannot express, on deploy/kubernetes/*.yaml:
              grace period vs WEIGHTINIT_SHUTDOWN_GRACE, gRPC probes on the
              served port, hardened securityContext, resources, selectors

Only the standard library and the `blake3` package (PyPI) are used.
"""

import argparse
import base64
import json
import re
import struct
import subprocess
import sys
import time

try:
    import blake3
except ImportError:  # only `vectors` works without it
    blake3 = None


def b64hex(s):
    return base64.b64decode(s).hex()


def cmd_vectors(args):
    with open(args.vectors) as f:
        cases = json.load(f)["cases"]
    if args.case:
        cases = [c for c in cases if c["case"] in args.case]
    failed = 0
    for case in cases:
        proc = subprocess.run(
            [args.grpcurl, "-plaintext", "-max-time", str(args.timeout), "-d", "@",
             args.addr, "weightinit.v1.WeightInit/Digest"],
            input=json.dumps(case["request"]), capture_output=True, text=True,
            timeout=args.timeout + 10)
        problems = []
        if proc.returncode != 0:
            problems.append(f"grpcurl exit {proc.returncode}: {proc.stderr.strip()}")
        else:
            got = json.loads(proc.stdout).get("digests", [])
            if len(got) != len(case["expect"]):
                problems.append(f"{len(got)} digests, expected {len(case['expect'])}")
            for i, (g, e) in enumerate(zip(got, case["expect"])):
                h = b64hex(g.get("blake3", ""))
                n = int(g.get("byteLength", "0"))
                if h != e["blake3"]:
                    problems.append(f"{e['name']}: blake3 {h} != {e['blake3']}")
                if n != e["byte_length"]:
                    problems.append(f"{e['name']}: byte_length {n} != {e['byte_length']}")
                if int(g.get("tensorIndex", 0)) != i:
                    problems.append(f"{e['name']}: tensorIndex {g.get('tensorIndex', 0)} != {i}")
        if problems:
            failed += 1
            print(f"FAIL vectors {case['case']}: " + "; ".join(problems))
        else:
            print(f"ok   vectors {case['case']} ({len(case['expect'])} tensors)")
    print(f"vectors: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed or not cases else 0


# grpcurl prints each message as indented JSON with one field per line; a chunk's
# base64 payload is always on one line. Parse line by line so a stream of any
# size is verified in constant memory.
FIELD = re.compile(r'^\s*"(\w+)":\s*"?([^",\s]*)"?,?\s*$')


def cmd_stream(args):
    if blake3 is None:
        sys.exit("the blake3 package is needed (pip install blake3)")
    tensors = {}  # index -> state
    cur_index = 0
    section = None
    chunk = {}
    end = {}
    chunks = 0
    start = time.monotonic()
    first_chunk_at = None

    def state(i):
        return tensors.setdefault(i, {"hasher": blake3.blake3(), "next": 0, "end": None, "header_len": None})

    def finish_chunk():
        nonlocal chunks, first_chunk_at
        i = int(chunk.get("tensorIndex", 0))
        off = int(chunk.get("offset", 0))
        data = base64.b64decode(chunk.get("data", ""))
        st = state(i)
        if off != st["next"]:
            raise SystemExit(f"FAIL stream: tensor {i} chunk at offset {off}, expected {st['next']}")
        st["hasher"].update(data)
        st["next"] += len(data)
        chunks += 1
        if first_chunk_at is None:
            first_chunk_at = time.monotonic()
            if args.started:
                open(args.started, "w").close()
        if args.chunk_delay:
            time.sleep(args.chunk_delay)

    for line in sys.stdin:
        s = line.strip()
        if s.startswith('"header"'):
            section, cur_index = "header", 0
        elif s.startswith('"chunk"'):
            section, chunk = "chunk", {}
        elif s.startswith('"end"'):
            section, end = "end", {}
        elif s == "}" and section in ("chunk", "end") and line.startswith("  }"):
            if section == "chunk":
                finish_chunk()
            else:
                i = int(end.get("tensorIndex", 0))
                state(i)["end"] = dict(end)
            section = None
        else:
            m = FIELD.match(line)
            if not m:
                continue
            key, val = m.groups()
            if section == "chunk":
                chunk[key] = val
            elif section == "end":
                end[key] = val
            elif section == "header" and key == "index":
                cur_index = int(val)
            elif section == "header" and key == "byteLength":
                state(cur_index)["header_len"] = int(val)

    problems = []
    if not tensors:
        problems.append("no message received")
    digests = {}
    for i, st in sorted(tensors.items()):
        if st["end"] is None:
            problems.append(f"tensor {i}: no end message (stream cut short)")
            continue
        got = st["hasher"].hexdigest()
        want = b64hex(st["end"].get("blake3", ""))
        n = int(st["end"].get("byteLength", "0"))
        if got != want:
            problems.append(f"tensor {i}: streamed bytes hash to {got}, end says {want}")
        if st["next"] != n or (st["header_len"] is not None and st["header_len"] != n):
            problems.append(f"tensor {i}: {st['next']} bytes streamed, header {st['header_len']}, end {n}")
        digests[i] = got
    if args.expect_digest:
        with open(args.expect_digest) as f:
            ref = json.load(f).get("digests", [])
        for i, d in enumerate(ref):
            if digests.get(i) != b64hex(d.get("blake3", "")):
                problems.append(f"tensor {i}: stream digest differs from Digest RPC")
    elapsed = time.monotonic() - start
    total = sum(st["next"] for st in tensors.values())
    if problems:
        print("FAIL stream: " + "; ".join(problems))
        return 1
    print(f"ok   stream: {len(tensors)} tensor(s), {chunks} chunks, {total} bytes in {elapsed:.1f}s, "
          f"blake3 verified ({', '.join(digests[i][:16] for i in sorted(digests))})")
    return 0


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            f.seek(base + a)
            data = f.read(b - a)
            if len(data) != b - a:
                raise SystemExit(f"FAIL safetensors: {path}: {name} truncated")
            out[name] = (blake3.blake3(data).hexdigest(), b - a)
        return out, header.get("__metadata__", {})


def cmd_safetensors(args):
    if blake3 is None:
        sys.exit("the blake3 package is needed (pip install blake3)")
    tensors, _meta = read_safetensors(args.file)
    if args.print:
        for name, (h, n) in tensors.items():
            print(f"{name} {n} {h}")
        return 0
    with open(args.vectors) as f:
        case = next(c for c in json.load(f)["cases"] if c["case"] == args.case)
    problems = []
    for e in case["expect"]:
        got = tensors.get(e["name"])
        if got is None:
            problems.append(f"{e['name']} missing")
        elif got != (e["blake3"], e["byte_length"]):
            problems.append(f"{e['name']}: {got[1]} bytes blake3 {got[0]}, expected {e['byte_length']} {e['blake3']}")
    if problems:
        print(f"FAIL safetensors {args.file} vs {args.case}: " + "; ".join(problems))
        return 1
    print(f"ok   safetensors {args.file}: {len(case['expect'])} tensors match vectors case {args.case}")
    return 0


def parse_duration(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", str(s).strip())
    if not m:
        raise ValueError(f"bad duration {s!r}")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def cmd_k8s_policy(args):
    import glob
    import yaml  # PyYAML, a dependency of kubernetes-validate

    docs = []
    for path in sorted(glob.glob(f"{args.dir}/*.yaml")):
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for path, d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    deps = by_kind.get("Deployment", [])
    need(len(deps) == 1, f"expected one Deployment, found {len(deps)}")
    if deps:
        dep = deps[0]
        spec = dep.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        sel = spec.get("selector", {}).get("matchLabels", {})
        need(spec.get("replicas") == args.replicas, f"replicas {spec.get('replicas')} != {args.replicas}")
        need(sel and all(labels.get(k) == v for k, v in sel.items()), "Deployment selector does not match its pod labels")
        psc = pod.get("securityContext", {})
        need(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot is not true")
        need(isinstance(psc.get("runAsUser"), int) and psc.get("runAsUser") > 0, "pod runAsUser is not a non-zero uid")
        cs = pod.get("containers", [])
        need(len(cs) == 1, "expected one container")
        for c in cs:
            name = c.get("name")
            env = {e.get("name"): e.get("value") for e in c.get("env", [])}
            sc = c.get("securityContext", {})
            need(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false")
            need(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem is not true")
            need(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot is not true")
            need(sc.get("privileged") in (None, False), f"{name}: privileged")
            need("ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: capabilities do not drop ALL")
            need(not sc.get("capabilities", {}).get("add"), f"{name}: adds capabilities")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    need(r in res.get(kind, {}), f"{name}: resources.{kind}.{r} missing")
            ports = [p.get("containerPort") for p in c.get("ports", [])]
            need(args.port in ports, f"{name}: containerPort {args.port} not declared")
            addr = env.get("WEIGHTINIT_ADDR", f"0.0.0.0:{args.port}")
            need(addr.rsplit(":", 1)[-1] == str(args.port), f"{name}: WEIGHTINIT_ADDR {addr} does not serve port {args.port}")
            for probe in ("readinessProbe", "livenessProbe"):
                pr = c.get(probe)
                need(pr is not None, f"{name}: no {probe}")
                if pr is not None:
                    need("grpc" in pr, f"{name}: {probe} is not a native gRPC probe")
                    need(pr.get("grpc", {}).get("port") == args.port, f"{name}: {probe} does not probe port {args.port}")
            if "startupProbe" in c:
                need(c["startupProbe"].get("grpc", {}).get("port") == args.port, f"{name}: startupProbe not gRPC on {args.port}")
            grace = env.get("WEIGHTINIT_SHUTDOWN_GRACE")
            need(grace is not None, f"{name}: WEIGHTINIT_SHUTDOWN_GRACE not set")
            pre = 0.0
            cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if len(cmd) == 2 and cmd[0] == "sleep":
                pre = parse_duration(cmd[1])
            if "sleep" in c.get("lifecycle", {}).get("preStop", {}):
                pre = float(c["lifecycle"]["preStop"]["sleep"].get("seconds", 0))
            tgp = pod.get("terminationGracePeriodSeconds", 30)
            if grace is not None:
                g = parse_duration(grace)
                need(tgp >= pre + g + args.margin,
                     f"terminationGracePeriodSeconds {tgp} < preStop {pre:g} + WEIGHTINIT_SHUTDOWN_GRACE {g:g} + margin {args.margin}")
                need(g == args.grace, f"WEIGHTINIT_SHUTDOWN_GRACE {g:g}s, expected the server default {args.grace}s")
        for kind in ("Service", "PodDisruptionBudget"):
            need(by_kind.get(kind), f"no {kind}")
            for o in by_kind.get(kind, []):
                osel = o.get("spec", {}).get("selector", {})
                osel = osel.get("matchLabels", osel) if kind == "PodDisruptionBudget" else osel
                need(osel and all(labels.get(k) == v for k, v in osel.items()),
                     f"{kind} {o['metadata']['name']}: selector does not match the pods")
        for svc in by_kind.get("Service", []):
            for p in svc.get("spec", {}).get("ports", []):
                tp = p.get("targetPort")
                need(tp == "grpc" or tp == args.port, f"Service {svc['metadata']['name']}: targetPort {tp}")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            ps = pdb.get("spec", {})
            mu, ma = ps.get("maxUnavailable"), ps.get("minAvailable")
            need(mu is not None or ma is not None, "PDB sets neither maxUnavailable nor minAvailable")
            if isinstance(mu, int):
                need(0 < mu < args.replicas, f"PDB maxUnavailable {mu} lets every replica go")
            if isinstance(ma, int):
                need(0 < ma < args.replicas, f"PDB minAvailable {ma} blocks every drain or protects nothing")
    if problems:
        for p in problems:
            print(f"FAIL k8s-policy: {p}")
        return 1
    print(f"ok   k8s-policy: {len(docs)} resources in {args.dir}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vectors")
    v.add_argument("--grpcurl", required=True)
    v.add_argument("--addr", required=True, help="host:port")
    v.add_argument("--vectors", required=True)
    v.add_argument("--case", action="append", help="only these cases (repeatable)")
    v.add_argument("--timeout", type=int, default=30)
    s = sub.add_parser("stream")
    s.add_argument("--chunk-delay", type=float, default=0.0, help="seconds to sleep after each chunk")
    s.add_argument("--started", help="file to create when the first chunk arrives")
    s.add_argument("--expect-digest", help="Digest RPC response (JSON) the stream must match")
    t = sub.add_parser("safetensors")
    t.add_argument("--file", required=True)
    t.add_argument("--vectors")
    t.add_argument("--case")
    t.add_argument("--print", action="store_true", help="print name, length, blake3 of each tensor")
    k = sub.add_parser("k8s-policy")
    k.add_argument("--dir", required=True)
    k.add_argument("--replicas", type=int, default=3)
    k.add_argument("--port", type=int, default=50051)
    k.add_argument("--grace", type=float, default=30.0, help="the server's shutdown grace, seconds")
    k.add_argument("--margin", type=float, default=5.0, help="least extra seconds before SIGKILL")
    args = p.parse_args()
    return {"vectors": cmd_vectors, "stream": cmd_stream, "safetensors": cmd_safetensors,
            "k8s-policy": cmd_k8s_policy}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
