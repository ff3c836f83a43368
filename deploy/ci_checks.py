#!/usr/bin/env python3
"""Checks used by deploy/ci-*.sh.

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
  shipped-limits  a replica's memory limit, CPUs and flags: the same in the
              Deployment and compose.yaml, every flag of the memory bound set; or
              as `docker run` options
  memory-bound  a server container's memory limit over the bound of what it
              reports of itself (deploy/README.md, "Memory limits")
  attack      one attack of issue 24 on a server container under those limits:
              it must survive it under its memory limit and answer afterwards

Only the standard library, the `blake3` package (PyPI), PyYAML (with kubernetes-validate)
and the docker CLI are used.
"""

import argparse
import base64
import json
import math
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time

try:
    import blake3
except ImportError:  # only `vectors` works without it
    blake3 = None


def b64hex(s):
    return base64.b64decode(s).hex()


def case_problems(grpcurl, addr, case, timeout):
    """What is wrong with the Digest the server at `addr` gives for one vector case."""
    proc = subprocess.run(
        [grpcurl, "-plaintext", "-max-time", str(timeout), "-d", "@",
         addr, "weightinit.v1.WeightInit/Digest"],
        input=json.dumps(case["request"]), capture_output=True, text=True, check=False,
        timeout=timeout + 10)
    if proc.returncode != 0:
        return [f"grpcurl exit {proc.returncode}: {proc.stderr.strip()}"]
    problems = []
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
    return problems


def cmd_vectors(args):
    with open(args.vectors) as f:
        cases = json.load(f)["cases"]
    if args.case:
        cases = [c for c in cases if c["case"] in args.case]
    failed = 0
    for case in cases:
        problems = case_problems(args.grpcurl, args.addr, case, args.timeout)
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


MIB = 1 << 20

# The parts of a replica's memory bound (deploy/README.md, "Memory limits") that the server
# does not report, measured there: the server at rest, and a worker's Digest buffer (one job).
BASELINE_MIB = 16
WORKER_MIB = 4
# The least part of the limit left over after the bound, for what the bound does not count.
MARGIN = 0.15
# The flags of the bound: the manifests set each, so that a default changing in the server
# cannot move the bound unseen.
BOUND_FLAGS = ("WEIGHTINIT_WORKERS", "WEIGHTINIT_MAX_CONCURRENT_STREAMS",
               "WEIGHTINIT_STRUCTURED_MEMORY_BYTES")


def quantity(text, units):
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text).strip())
    if not m or m.group(2) not in units:
        raise ValueError(f"cannot read the quantity {text!r}")
    return float(m.group(1)) * units[m.group(2)]


K8S_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
DOCKER_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def shipped_limits(kubernetes, compose):
    """The memory limit, CPUs and environment of a replica in the Kubernetes Deployment and in
    compose.yaml, and what differs between the two."""
    import yaml  # PyYAML, a dependency of kubernetes-validate

    with open(kubernetes) as f:
        dep = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    cpus = quantity(c["resources"]["limits"]["cpu"], K8S_UNITS)
    k8s = {"memory": int(quantity(c["resources"]["limits"]["memory"], K8S_UNITS)), "cpus": cpus,
           "env": {}}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("resourceFieldRef", {})
        if ref.get("resource") == "limits.cpu":  # rounded up, as the kubelet does
            k8s["env"][e["name"]] = str(math.ceil(cpus / quantity(ref.get("divisor", "1"), K8S_UNITS)))
        else:
            k8s["env"][e["name"]] = str(e["value"])
    with open(compose) as f:
        replicas = [s for n, s in yaml.safe_load(f)["services"].items() if n.startswith("weightinit-")]
    differ = []
    for r in replicas:
        mem = int(quantity(r.get("mem_limit", "0"), DOCKER_UNITS))
        swap = int(quantity(r.get("memswap_limit", "0"), DOCKER_UNITS))
        env = {k: str(v) for k, v in r.get("environment", {}).items()}
        got = {"memory": mem, "cpus": float(r.get("cpus", 0)), "env": env}
        for key in sorted(set(got) | set(got["env"]) | set(k8s["env"])):
            ours, theirs = (d.get(key, d["env"].get(key)) for d in (got, k8s))
            if ours != theirs:
                differ.append(f"{key} is {ours} in compose.yaml, {theirs} in the Deployment")
        if swap != mem:
            differ.append(f"compose.yaml: memswap_limit {swap} is not mem_limit {mem} (no swap)")
    return k8s, differ


def cmd_shipped_limits(args):
    limits, problems = shipped_limits(args.kubernetes, args.compose)
    if args.docker_args:
        print(f"--memory={limits['memory']}\n--memory-swap={limits['memory']}\n--cpus={limits['cpus']:g}")
        for k, v in sorted(limits["env"].items()):
            print(f"--env={k}={v}")
        return 0
    missing = [f for f in BOUND_FLAGS if f not in limits["env"]]
    if missing:
        problems.append("the manifests must set " + ", ".join(missing))
    if problems:
        for p in problems:
            print(f"FAIL shipped-limits: {p}")
        return 1
    print(f"ok   shipped-limits: {limits['memory'] / MIB:g} MiB, {limits['cpus']:g} CPUs, "
          + ", ".join(f"{f}={limits['env'][f]}" for f in BOUND_FLAGS))
    return 0


def cmd_memory_bound(args):
    """The memory bound of the server in container `--container`, from what it reports of
    itself (GetInfo; the bounds of a stream and of the panels in its startup log line), against
    its container's memory limit."""
    box = Container(args.container)
    env = dict(e.split("=", 1) for e in box.inspect()["Config"]["Env"])
    logs = subprocess.run(["docker", "logs", box.name], capture_output=True, text=True,
                          timeout=30, check=True)
    reported = next((json.loads(line)["fields"] for line in (logs.stdout + logs.stderr).splitlines()
                     if '"security and limits"' in line), {})
    if "stream_memory_bytes" not in reported:
        print("FAIL memory-bound: no stream_memory_bytes in the server's JSON log line "
              "'security and limits' (a server from before issue 24?)")
        return 1
    getinfo = subprocess.run([args.grpcurl, "-plaintext", "-max-time", "30", args.addr,
                              "weightinit.v1.WeightInit/GetInfo"],
                             capture_output=True, text=True, timeout=40, check=True)
    limits = json.loads(getinfo.stdout)["limits"]
    workers = int(env["WEIGHTINIT_WORKERS"])
    streams = int(limits["maxConcurrentStreams"])
    stream = int(reported["stream_memory_bytes"]) / MIB
    parts = [("at rest", BASELINE_MIB),
             (f"for {streams} streams x {stream:g}", streams * stream),
             ("of panels", int(reported["panel_memory_bytes"]) / MIB),
             (f"for {workers} workers x {WORKER_MIB}", workers * WORKER_MIB),
             ("of --structured-memory-bytes", int(limits["structuredMemoryBytes"]) / MIB)]
    bound = sum(n for _, n in parts)
    limit = box.limit() / MIB
    what = f"bound {bound:g} MiB = " + " + ".join(f"{n:g} {what}" for what, n in parts)
    if bound > limit * (1 - MARGIN):
        print(f"FAIL memory-bound: {what}: over {limit * (1 - MARGIN):.0f} MiB, the limit "
              f"{limit:g} MiB less {MARGIN:.0%}")
        return 1
    print(f"ok   memory-bound: {what}; {1 - bound / limit:.0%} of the {limit:g} MiB limit left")
    return 0


class Container:
    """A running container: its state (docker inspect), memory and CPU (its cgroup, v1 or v2)."""

    def __init__(self, name):
        self.name = name
        info = self.inspect()
        self.id = info["Id"]
        self.memory, self.cpu, self.v2 = cgroup_dirs(info["State"]["Pid"])

    def inspect(self):
        out = subprocess.run(["docker", "inspect", self.name], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return json.loads(out)[0]

    def _read(self, name):
        with open(f"{self.memory}/{name}") as f:
            return f.read()

    def usage(self):
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def peak(self):
        return int(self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))

    def reset_peak(self):
        """Starts the peak afresh (cgroup v1, or v2 on Linux >= 6.12); False where it cannot."""
        try:
            with open(f"{self.memory}/{'memory.peak' if self.v2 else 'memory.max_usage_in_bytes'}", "w") as f:
                f.write("0")
            return True
        except OSError:
            return False

    def limit(self):
        raw = self._read("memory.max" if self.v2 else "memory.limit_in_bytes").strip()
        return None if raw == "max" else int(raw)

    def cpu_seconds(self):
        if self.v2:
            with open(f"{self.cpu}/cpu.stat") as f:
                return int(next(ln.split()[1] for ln in f if ln.startswith("usage_usec"))) / 1e6
        with open(f"{self.cpu}/cpuacct.usage") as f:
            return int(f.read()) / 1e9


def cgroup_dirs(pid):
    """The memory and CPU cgroup directories of process `pid`, and whether they are cgroup v2."""
    memory = cpu = unified = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = controllers.split(",")
            if "memory" in names:
                memory = f"/sys/fs/cgroup/memory{path}"
            if "cpuacct" in names:
                cpu = f"/sys/fs/cgroup/{controllers}{path}"
            if controllers == "":
                unified = f"/sys/fs/cgroup{path}"
    if memory is None:
        return unified, unified, True
    return memory, cpu, False


class Sampler:
    """The highest memory use of a container while the `with` block runs, sampled every 20 ms
    (the cgroup's own peak is read too where it can be reset)."""

    def __init__(self, box):
        self.box, self.high, self.stop = box, 0, False

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            try:
                self.high = max(self.high, self.box.usage())
            except OSError:  # the cgroup is gone with its container
                return
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def grpcurl_call(args, rpc, request, stdout=subprocess.DEVNULL, max_time=None):
    """A `grpcurl` call of WeightInit/`rpc`, started (the request goes in on stdin)."""
    cmd = [args.grpcurl, "-plaintext"] + (["-max-time", str(max_time)] if max_time else [])
    proc = subprocess.Popen(cmd + ["-d", "@", args.addr, f"weightinit.v1.WeightInit/{rpc}"],
                            stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE)
    proc.stdin.write(json.dumps(request).encode())
    proc.stdin.close()
    return proc


def end_all(procs):
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()


def refused(proc):
    """Whether a finished grpcurl call was refused for lack of room (RESOURCE_EXHAUSTED)."""
    return proc.returncode not in (None, 0) and b"ResourceExhausted" in proc.stderr.read()


def orthogonal(names, shape, **spec):
    return {"seed": 24, "tensors": [{"name": n, "shape": shape, "init": {"orthogonal": {}}, **spec}
                                    for n in names]}


def first_messages(procs, marker, wait):
    """Reads the stdout of all `procs` at once, each until `marker` has come on it (and then
    no more), it ends, `wait` seconds are over or none has come for 5 s: how many it came on."""
    tails = {p.stdout.fileno(): b"" for p in procs}
    came, deadline, quiet = 0, time.monotonic() + wait, time.monotonic() + 5
    while tails and time.monotonic() < min(deadline, quiet):
        ready, _, _ = select.select(list(tails), [], [], 0.2)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            seen = tails.pop(fd)[-len(marker):] + data
            if data and marker in seen:
                came, quiet = came + 1, time.monotonic() + 5
            elif data:
                tails[fd] = seen
    return came


def attack_tall_digest(args, _box):
    """One Digest of orthogonal [16777216, 1]: a 64 MiB tensor from a QR of a tall matrix."""
    proc = grpcurl_call(args, "Digest", orthogonal(["tall"], [16777216, 1]),
                        stdout=subprocess.PIPE, max_time=args.timeout)
    out = proc.stdout.read()  # until grpcurl's -max-time at most
    if proc.wait() != 0:
        return [], [f"Digest failed (grpcurl exit {proc.returncode}): {proc.stderr.read().decode().strip()}"]
    n = int(json.loads(out)["digests"][0].get("byteLength", 0))
    return ["answered"], [] if n == 4 * 16777216 else [f"byteLength {n}"]


def permuted_view(i):
    """Keras layouts of torch weights, in turn: the Dense kernels of a square and of a wide
    Linear weight, and the kernel of a Conv2d weight. Whether each is made by rows or in
    panels is the server's choice; the three cover both."""
    spec = [{"shape": [8192, 8192], "init": {"normal": {}}, "permute": [1, 0]},
            {"shape": [65536, 1024], "init": {"normal": {}}, "permute": [1, 0]},
            {"shape": [2048, 1024, 3, 3], "init": {"kaimingNormal": {}}, "permute": [2, 3, 1, 0]}]
    return {"seed": i, "tensors": [{"name": f"view{i}", **spec[i % 3]}]}


def slow_readers(n):
    def attack(args, _box):
        procs = [grpcurl_call(args, "Generate", permuted_view(i), stdout=subprocess.PIPE)
                 for i in range(n)]
        try:
            # One message each (the header, then the first chunk's data), then no more reading.
            stalled = first_messages(procs, b'"data"', args.timeout)
            time.sleep(args.hold)  # for the server to fill what it may while nobody reads
            ended = [p for p in procs if p.poll() is not None]
            turned_away = sum(refused(p) for p in ended)
        finally:
            end_all(procs)
        waiting = n - len(ended) - stalled
        notes = [(f"{stalled} stalled after one message, {waiting} waiting for room, "
                  f"{turned_away} refused (RESOURCE_EXHAUSTED)")]
        failed = len(ended) - turned_away
        return notes, [f"{failed} of {n} readers failed"] if failed else []
    return attack


def attack_orthogonal_generates(args, _box):
    """8 Generates of orthogonal [4096, 4096] at once, read at full speed, cancelled after --hold s."""
    procs = [grpcurl_call(args, "Generate", orthogonal([f"q{i}"], [4096, 4096])) for i in range(8)]
    time.sleep(args.hold)
    ended = [p for p in procs if p.poll() is not None]
    failed = [p.stderr.read().decode().strip() for p in ended if p.returncode != 0]
    end_all(procs)
    notes = [f"{len(ended) - len(failed)} finished, {len(procs) - len(ended)} cancelled after {args.hold:g} s"]
    return notes, [f"a stream failed: {failed[0]}"] if failed else []


def attack_cancelled_orthogonal(args, box):
    """64 orthogonal [4096, 4096] (Generate and Digest in turn) cancelled 0.8 s after they
    start: the server must be idle again (under 0.2 CPU-s a second) a second later."""
    procs = [grpcurl_call(args, "Generate" if i % 2 == 0 else "Digest",
                          orthogonal([f"c{i}"], [4096, 4096])) for i in range(64)]
    time.sleep(0.8)
    turned_away = sum(refused(p) for p in procs if p.poll() is not None)
    end_all(procs)
    time.sleep(1)
    cpu = box.cpu_seconds()
    time.sleep(1)
    busy = box.cpu_seconds() - cpu
    notes = [f"{turned_away} refused (RESOURCE_EXHAUSTED), then {busy:.2f} CPU-s in the 2nd second"]
    return notes, [f"still busy 1 s after the cancellation: {busy:.2f} CPU-s/s"] if busy > 0.2 else []


def attack_oversized_cost(args, _box):
    """A Digest of 1,000 orthogonal [4096, 4096] and a Generate of 100,000 one-element slices
    of as many: refused (RESOURCE_EXHAUSTED, --max-request-work) before any work."""
    notes, problems = [], []
    one = {"flat": {"start": 0, "stop": 1}}
    for rpc, request in (("Digest", orthogonal([f"w{i}" for i in range(1000)], [4096, 4096])),
                         ("Generate", orthogonal([f"s{i}" for i in range(100_000)], [4096, 4096],
                                                 slice=one))):
        began = time.monotonic()
        proc = grpcurl_call(args, rpc, request, max_time=args.timeout)
        proc.wait(timeout=args.timeout + 10)
        err = proc.stderr.read().decode()
        took = time.monotonic() - began
        notes.append(f"{rpc} ({len(json.dumps(request)) // 1000} KB of JSON) refused in {took:.1f} s")
        if "ResourceExhausted" not in err or "--max-request-work" not in err:
            problems.append(f"{rpc} was not refused over --max-request-work: exit {proc.returncode} {err.strip()}")
    return notes, problems


ATTACKS = {
    "tall-digest": attack_tall_digest,
    "slow-permuted-12": slow_readers(12),
    "slow-permuted-48": slow_readers(48),
    "orthogonal-generates": attack_orthogonal_generates,
    "cancelled-orthogonal": attack_cancelled_orthogonal,
    "oversized-cost": attack_oversized_cost,
}


def cmd_attack(args):
    """Runs one attack on the server in container `--container`; it must survive it (not
    OOM-killed, not restarted, running), stay under its memory limit and then answer a small
    Digest correctly."""
    box = Container(args.container)
    limit = box.limit()
    with open(args.vectors) as f:
        small = next(c for c in json.load(f)["cases"] if c["case"] == args.small_case)
    fresh = box.reset_peak()
    start = box.usage()  # freed memory the allocator keeps from earlier attacks is in it
    began = time.monotonic()
    with Sampler(box) as sampler:
        notes, problems = ATTACKS[args.name](args, box)
        time.sleep(0.5)  # what the server frees once its clients are gone
    notes.insert(0, f"{time.monotonic() - began:.1f} s")
    info = box.inspect()
    state = info["State"]
    if state.get("OOMKilled") or info.get("RestartCount", 0) != 0 or not state.get("Running"):
        problems.append(f"the container did not survive: OOMKilled {state.get('OOMKilled')}, "
                        f"RestartCount {info.get('RestartCount')}, Running {state.get('Running')}")
        peak = sampler.high  # its cgroup went with it
    else:
        peak = max(sampler.high, box.peak() if fresh else 0)
        began = time.monotonic()
        problems += [f"small Digest afterwards: {p}" for p in
                     case_problems(args.grpcurl, args.addr, small, args.timeout)]
        notes.append(f"small Digest afterwards in {time.monotonic() - began:.1f} s")
    if limit is not None and peak >= limit:
        problems.append(f"memory reached the limit ({peak / MIB:.0f} MiB)")
    limit_mib = f"{limit / MIB:.0f} MiB" if limit else "none"
    what = (f"{args.name}: {start / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB"
            f"{'' if fresh else ' (since the container started)'}, limit {limit_mib}; "
            + "; ".join(notes))
    if problems:
        print(f"FAIL attack {what}: " + "; ".join(problems))
        return 1
    print(f"ok   attack {what}")
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
    m = sub.add_parser("shipped-limits", help="the manifests' limits and flags agree")
    m.add_argument("--kubernetes", required=True, help="the Deployment's file")
    m.add_argument("--compose", required=True)
    m.add_argument("--docker-args", action="store_true", help="print them as `docker run` options")
    b = sub.add_parser("memory-bound", help="a server container's limit holds its memory bound")
    b.add_argument("--grpcurl", required=True)
    b.add_argument("--addr", required=True, help="host:port")
    b.add_argument("--container", required=True, help="docker name or id of the server")
    a = sub.add_parser("attack", help="one attack on a container; it must survive it")
    a.add_argument("name", choices=sorted(ATTACKS))
    a.add_argument("--grpcurl", required=True)
    a.add_argument("--addr", required=True, help="host:port")
    a.add_argument("--container", required=True, help="docker name or id of the server")
    a.add_argument("--vectors", required=True)
    a.add_argument("--small-case", default="mlp_torch_defaults", help="the vector case asked afterwards")
    a.add_argument("--hold", type=float, default=4.0, help="seconds an attack keeps its clients")
    a.add_argument("--timeout", type=int, default=60)
    args = p.parse_args()
    return {"vectors": cmd_vectors, "stream": cmd_stream, "safetensors": cmd_safetensors,
            "k8s-policy": cmd_k8s_policy, "attack": cmd_attack,
            "shipped-limits": cmd_shipped_limits, "memory-bound": cmd_memory_bound}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
