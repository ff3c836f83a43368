"""target="local": the engine in this process, writing into the caller's arrays and torch
parameters the very bytes a server sends, and refusing what it cannot write to."""

import multiprocessing

import numpy as np
import pytest
import torch

import weightinit

REQUEST = {
    "seed": 11,
    "tensors": [
        {"name": "w", "shape": [300, 700], "init": {"kaimingUniform": {"a": 2.23606797749979}}},
        {"name": "b", "shape": [700], "init": {"normal": {"std": 0.02}}, "dtype": "DTYPE_BFLOAT16"},
        {"name": "e", "shape": [0, 4], "init": {"zeros": {}}},
    ],
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(1000, 64),
        torch.nn.Linear(64, 256),
        torch.nn.LayerNorm(256),
        torch.nn.Conv1d(256, 32, 3),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_module_local_writes_the_servers_bytes(dtype, target):
    local, remote = _model().to(dtype), _model().to(dtype)
    weightinit.torch.init_module(local, 7, "local")
    weightinit.torch.init_module(remote, 7, target)
    for (name, mine), theirs in zip(local.named_parameters(), remote.parameters()):
        assert torch.equal(_bytes(mine), _bytes(theirs)), name


def _bytes(tensor):
    return tensor.detach().reshape(-1).view(torch.uint8)


def test_local_digest_is_blake3_of_the_fetched_bytes(target):
    import blake3

    fetched = weightinit.fetch(REQUEST, "local")
    digests = weightinit.digest(REQUEST, "local")
    assert digests == weightinit.digest(REQUEST, target)
    for name, value in fetched.items():
        raw = value.view(torch.int16).numpy() if isinstance(value, torch.Tensor) else value
        assert blake3.blake3(raw.tobytes()).hexdigest() == digests[name]


@pytest.mark.parametrize("where", ["--local", "--server"])
def test_the_cli_prints_the_digests_python_returns(where, target, tmp_path):
    """`weightinit digest` prints `HEX  NAME` lines; the names come from the Digest reply."""
    import json
    import subprocess

    from conftest import _server_binary

    path = tmp_path / "request.json"
    path.write_text(json.dumps(REQUEST))
    flags = ["--local"] if where == "--local" else ["--server", target]
    done = subprocess.run(
        [_server_binary(), "digest", *flags, "--request", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = weightinit.digest(REQUEST, target)
    assert done.stdout.splitlines() == [f"{hex_}  {name}" for name, hex_ in expected.items()]


def test_large_tensors_span_many_blocks_and_threads(target):
    """Several MiB, a transposing view and a shard: the parallel pieces meet exactly."""
    request = {
        "seed": 3,
        "tensors": [
            {"name": "big", "shape": [1500, 1700], "init": {"xavierNormal": {}}},
            {"name": "t", "shape": [900, 1100], "init": {"uniform": {}}, "permute": [1, 0]},
            {
                "name": "s",
                "shape": [1024, 2048],
                "init": {"heNormal": {}},
                "layout": "LAYOUT_KERAS",
                "slice": {"shard": {"dim": 1, "index": 1, "count": 3}},
            },
        ],
    }
    assert weightinit.digest(request, "local") == weightinit.digest(request, target)
    local, remote = weightinit.fetch(request, "local"), weightinit.fetch(request, target)
    for name in remote:
        assert local[name].tobytes() == remote[name].tobytes(), name


def test_many_small_tensors_in_one_pass(target):
    """Hundreds of small tensors of every scheme kind, filled in one parallel pass, each
    exactly the server's bytes."""
    inits = [{"normal": {"std": 0.02}}, {"uniform": {}}, {"ones": {}}, {"orthogonal": {}}]
    request = {
        "seed": 5,
        "tensors": [
            {"name": f"t{i}", "shape": [3 + i % 7, 5 + i % 3], "init": inits[i % 4]}
            for i in range(400)
        ],
    }
    local = weightinit.fetch(request, "local")
    remote = weightinit.fetch(request, target)
    assert list(local) == list(remote)
    for name, value in remote.items():
        assert local[name].tobytes() == value.tobytes(), name


def test_in_process_calls_start_no_thread_each():
    """Every fetch runs on the engine's pool, whose threads are made once: no thread is started
    per call (one started as memory runs out can abort the interpreter in glibc)."""
    import os
    import threading

    request = {
        "seed": 3,
        "tensors": [{"name": "w", "shape": [4096, 4096], "init": {"normal": {"std": 0.02}}}],
    }
    out = {"w": np.empty((4096, 4096), np.float32)}
    weightinit.fetch(request, "local", out=out)  # the pool's threads, made on first use
    seen = {1: set(), 2: set()}
    phase, done = [1], threading.Event()

    def sample():
        while not done.is_set():
            seen[phase[0]].update(os.listdir("/proc/self/task"))
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for phase[0] in (1, 2):
            for _ in range(3):
                weightinit.fetch(request, "local", out=out)
    finally:
        done.set()
        sampler.join()
    assert len(seen[1]) > 2, "the sampler saw no thread"
    assert seen[2] <= seen[1], f"threads started by the second calls: {seen[2] - seen[1]}"


def test_destinations_that_overlap_are_refused_before_anything_is_written():
    shared = np.full(8 * 1024, 7, np.uint8)
    request = {
        "seed": 1,
        "tensors": [
            {"name": "a", "shape": [1024], "init": {"normal": {}}},
            {"name": "b", "shape": [1024], "init": {"normal": {}}},
        ],
    }
    out = {"a": shared[:4096].view(np.float32), "b": shared[2048:6144].view(np.float32)}
    with pytest.raises(ValueError, match=r"tensors \"a\" and \"b\" overlap"):
        weightinit.fetch(request, "local", out=out)
    assert (shared == 7).all()


def test_into_caller_buffers():
    headers = weightinit.describe(REQUEST, "local")
    out = {"w": np.empty((300, 700), np.float32), "b": bytearray(1400)}
    result = weightinit.fetch(REQUEST, "local", out=out)
    assert result["w"] is out["w"] and result["b"] is out["b"]
    assert int(headers["w"]["byteLength"]) == out["w"].nbytes
    assert out["w"].tobytes() == weightinit.fetch(REQUEST, "local")["w"].tobytes()


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        (np.empty((300, 699), np.float32), r"out\['w'\] has 838800 bytes, the tensor 840000"),
        (np.empty((700, 300), np.float32).T, r"out\['w'\] must be writable and C-contiguous"),
        (bytes(840000), r"out\['w'\] must be writable and C-contiguous"),
    ],
)
def test_destinations_are_checked_before_anything_is_written(dest, message):
    with pytest.raises(ValueError, match=message):
        weightinit.fetch(REQUEST, "local", out={"w": dest})


def test_a_destination_that_is_no_buffer_is_a_type_error():
    with pytest.raises(TypeError, match=r"out\['w'\] is a list, not a buffer"):
        weightinit.fetch(REQUEST, "local", out={"w": [0.0] * 210000})


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match=r"out names tensors that are not in the request"):
        weightinit.fetch(REQUEST, "local", out={"x": np.empty(1)})
    with pytest.raises(ValueError, match=r"seed: must be in 0\.\.2\*\*64-1"):
        weightinit.fetch({**REQUEST, "seed": -1}, "local")
    with pytest.raises(ValueError, match=r'security: target "local" runs in this process'):
        weightinit.Client("local", security=weightinit.Security(token="t0k3n-for-nobody"))
    with pytest.raises(weightinit.RequestRefused, match=r"^tensors\[1\]\.init\.uniform"):
        weightinit.fetch(
            {
                "seed": 1,
                "tensors": [
                    REQUEST["tensors"][0],
                    {"name": "u", "shape": [2], "init": {"uniform": {"low": 1, "high": 0}}},
                ],
            },
            "local",
        )


def _digest_in_child(queue):
    queue.put(weightinit.digest(REQUEST, "local"))


def test_a_forked_child_generates_too():
    """The parent's threads do not survive fork(): the child must not wait on them."""
    expected = weightinit.digest(REQUEST, "local")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_digest_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == expected
    finally:
        child.join(10)
        child.kill()


_INTERRUPTED = """
import sys
import weightinit

request = {"seed": 1, "tensors": [{"name": "w", "shape": SHAPE, "init": INIT}]}
print("started", flush=True)
try:
    weightinit.CALL(request, "local")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("call", "shape", "init"),
    [
        ("digest", [1 << 18, 1 << 20], {"normal": {}}),  # 1 TiB: hours of work
        ("fetch", [4096, 4096], {"orthogonal": {}}),  # the QR: tens of seconds
    ],
    ids=["digest-1TiB", "fetch-orthogonal"],
)
def test_ctrl_c_stops_local_work_within_a_second(call, shape, init):
    """SIGINT during in-process work raises KeyboardInterrupt at once, not when Rust returns."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = _INTERRUPTED.replace("SHAPE", repr(shape)).replace("INIT", repr(init))
    child = subprocess.Popen(
        [sys.executable, "-c", script.replace("CALL", call)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        assert child.stdout.readline().strip() == "started"
        time.sleep(1.0)  # into the work: past import and planning
        assert child.poll() is None, "the work ended before the signal"
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        child.kill()
    assert (code, child.stdout.read().strip()) == (3, "interrupted")
    assert elapsed < 1.0, f"{elapsed:.2f} s from SIGINT to exit"


_OUT_OF_MEMORY = """
import resource
import weightinit


def request(shape, init):
    return {"seed": 1, "tensors": [{"name": "w", "shape": shape, "init": init}]}


small = request([64, 64], {"orthogonal": {}})
expected = weightinit.digest(small, "local")  # the generation threads start before the limit
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
# Room for small requests and a 512 MiB digest (made block by block), not for an 8 GiB
# array, orthogonal's 256 MiB of matrices or sparse's 192 MiB of row permutation.
resource.setrlimit(resource.RLIMIT_AS, (size + (160 << 20),) * 2)
for call, shape, init in CASES:
    try:
        getattr(weightinit, call)(request(shape, init), "local")
        print(call, "ok", flush=True)
    except MemoryError as error:
        print(call, "MemoryError", error, flush=True)
assert weightinit.digest(small, "local") == expected
assert weightinit.fetch(small, "local")["w"].shape == (64, 64)
print("alive")
"""


def test_out_of_memory_is_a_memory_error_and_the_interpreter_lives_on():
    """Under an address-space limit, a tensor that does not fit raises MemoryError naming it
    (NumPy's for the array, the engine's for the whole matrices of orthogonal and sparse),
    where an allocation failing in Rust would abort the interpreter; small requests go on."""
    import subprocess
    import sys

    cases = [
        ("fetch", [65536, 32768], {"normal": {}}),
        ("fetch", [4096, 4096], {"orthogonal": {}}),
        ("digest", [4096, 4096], {"orthogonal": {}}),
        ("digest", [16777216, 1], {"sparse": {"sparsity": 0.5}}),
        ("digest", [8192, 16384], {"normal": {}}),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_MEMORY.replace("CASES", repr(cases))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fetch MemoryError tensor 'w': Unable to allocate 8.00 GiB"), lines
    engine = 'MemoryError tensor "w" does not fit in this process\'s memory: cannot allocate'
    for line, call in zip(lines[1:4], ["fetch", "digest", "digest"]):
        assert line.startswith(f"{call} {engine} "), lines
        assert int(line.split()[-2]) >= 1 << 19, line
    assert lines[4:] == ["digest ok", "alive"]


def test_the_cli_fetching_what_does_not_fit_says_so(tmp_path):
    """`weightinit fetch --local` out of memory exits 1 naming the tensor, without an abort."""
    import json
    import resource
    import subprocess

    from conftest import _server_binary

    path = tmp_path / "request.json"
    shape = [4096, 4096]
    path.write_text(
        json.dumps({"tensors": [{"name": "q", "shape": shape, "init": {"orthogonal": {}}}]})
    )
    done = subprocess.run(
        [
            _server_binary(),
            "fetch",
            "--local",
            "--request",
            path,
            "--out",
            tmp_path / "q.safetensors",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # The QR's 256 MiB of matrices cannot fit in this address space.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (200 << 20,) * 2),
    )
    assert done.returncode == 1, done.stderr
    assert 'tensor "q" does not fit in this process\'s memory: cannot allocate' in done.stderr
    assert not (tmp_path / "q.safetensors").exists()
