"""A second implementation of algorithm v1's structured schemes (orthogonal, eye, identity,
dirac, sparse) in NumPy, written from docs/ALGORITHM.md alone: sections 2-4 and 6 for the words
and draws, 9 for dtypes, and "Additions to algorithm v1: structured schemes".

Slow and plain on purpose: every sum is a Python-level loop over rows in the order the text
fixes, vectorized across columns only. Meant for small tensors.
"""

import hashlib
import math
import struct

import numpy as np

_MASK = np.uint64(0xFFFFFFFF)


def key(seed: int, name: str) -> bytes:
    """Section 2."""
    message = b"weightinit-v1\x00" + struct.pack("<Q", seed) + name.encode()
    return hashlib.sha256(message).digest()


def _rotl(x, n):
    return ((x << np.uint32(n)) | (x >> np.uint32(32 - n))).astype(np.uint32)


def _blocks(k: bytes, first: int, count: int) -> np.ndarray:
    """ChaCha8 blocks first..first+count-1 as [count, 16] u32 words (section 3)."""
    counters = np.arange(first, first + count, dtype=np.uint64)
    init = np.zeros((16, count), dtype=np.uint32)
    init[0:4] = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], np.uint32)[:, None]
    init[4:12] = np.array(struct.unpack("<8I", k), np.uint32)[:, None]
    init[12] = (counters & _MASK).astype(np.uint32)
    init[13] = (counters >> np.uint64(32)).astype(np.uint32)
    s = [row.copy() for row in init]

    def quarter(a, b, c, d):
        s[a] = s[a] + s[b]
        s[d] = _rotl(s[d] ^ s[a], 16)
        s[c] = s[c] + s[d]
        s[b] = _rotl(s[b] ^ s[c], 12)
        s[a] = s[a] + s[b]
        s[d] = _rotl(s[d] ^ s[a], 8)
        s[c] = s[c] + s[d]
        s[b] = _rotl(s[b] ^ s[c], 7)

    for _ in range(4):
        quarter(0, 4, 8, 12)
        quarter(1, 5, 9, 13)
        quarter(2, 6, 10, 14)
        quarter(3, 7, 11, 15)
        quarter(0, 5, 10, 15)
        quarter(1, 6, 11, 12)
        quarter(2, 7, 8, 13)
        quarter(3, 4, 9, 14)
    return (np.stack(s) + init).T


def words(k: bytes, first: int, count: int) -> np.ndarray:
    """Words first..first+count-1 of the keystream, as u64."""
    if count == 0:
        return np.zeros(0, np.uint64)
    b0, b1 = first // 8, (first + count - 1) // 8
    out = _blocks(k, b0, b1 - b0 + 1).astype(np.uint64)
    pairs = out[:, 0::2] | (out[:, 1::2] << np.uint64(32))
    flat = pairs.reshape(-1)
    start = first - 8 * b0
    return flat[start : start + count]


def open_unit(w: np.ndarray) -> np.ndarray:
    """p of section 4."""
    u = ((w >> np.uint64(12)) | np.uint64(0x3FF0000000000000)).view(np.float64) - 1.0
    return u + 2.0**-53


# Section 6, c0 first.
_A = [3.387132872796366608, 133.14166789178437745, 1971.5909503065514427, 13731.693765509461125,
      45921.953931549871457, 67265.770927008700853, 33430.575583588128105, 2509.0809287301226727]  # fmt: skip
_B = [1.0, 42.313330701600911252, 687.1870074920579083, 5394.1960214247511077,
      21213.794301586595867, 39307.89580009271061, 28729.085735721942674, 5226.495278852854561]  # fmt: skip
_C = [1.42343711074968357734, 4.6303378461565452959, 5.7694972214606914055,
      3.64784832476320460504, 1.27045825245236838258, 0.24178072517745061177,
      0.0227238449892691845833, 7.7454501427834140764e-4]  # fmt: skip
_D = [1.0, 2.05319162663775882187, 1.6763848301838038494, 0.68976733498510000455,
      0.14810397642748007459, 0.0151986665636164571966, 5.475938084995344946e-4,
      1.05075007164441684324e-9]  # fmt: skip
_E = [6.6579046435011037772, 5.4637849111641143699, 1.7848265399172913358,
      0.29656057182850489123, 0.026532189526576123093, 0.0012426609473880784386,
      2.71155556874348757815e-5, 2.01033439929228813265e-7]  # fmt: skip
_F = [1.0, 0.59983220655588793769, 0.13692988092273580531, 0.0148753612908506148525,
      7.868691311456132591e-4, 1.8463183175100546818e-5, 1.4215117583164458887e-7,
      2.04426310338993978564e-15]  # fmt: skip


def _horner(c, r):
    acc = np.full_like(r, c[7])
    for coefficient in reversed(c[:7]):
        acc = acc * r + coefficient
    return acc


# fdlibm's e_log.c, as musl and Rust's libm crate have it (section 0 requires that log).
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG = [6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
       2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
       1.479819860511658591e-01]  # fmt: skip


def ln(x: np.ndarray) -> np.ndarray:
    """log of positive normal f64 values other than 1, bit for bit as musl's."""
    ui = x.view(np.uint64)
    hx = (ui >> np.uint64(32)) + np.uint64(0x3FF00000 - 0x3FE6A09E)
    k = (hx >> np.uint64(20)).astype(np.int64) - 0x3FF
    hx = (hx & np.uint64(0x000FFFFF)) + np.uint64(0x3FE6A09E)
    f = ((hx << np.uint64(32)) | (ui & _MASK)).view(np.float64) - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
    t2 = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6])))
    r = t2 + t1
    dk = k.astype(np.float64)
    return s * (hfsq + r) + dk * _LN2_LO - hfsq + f + dk * _LN2_HI


def quantile(p: np.ndarray) -> np.ndarray:
    """N(p), section 6."""
    q = p - 0.5
    central = np.abs(q) <= 0.425
    out = np.empty_like(p)
    qc = q[central]
    r = 0.180625 - qc * qc
    out[central] = (qc * _horner(_A, r)) / _horner(_B, r)
    qt, pt = q[~central], p[~central]
    r = np.sqrt(-ln(np.where(qt < 0, pt, 1.0 - pt)))
    near = r <= 5.0
    v = np.empty_like(r)
    v[near] = _horner(_C, r[near] - 1.6) / _horner(_D, r[near] - 1.6)
    v[~near] = _horner(_E, r[~near] - 5.0) / _horner(_F, r[~near] - 5.0)
    out[~central] = np.where(qt < 0, -v, v)
    return out


def draws(k: bytes, count: int) -> np.ndarray:
    """Draw i = N(p_i) for i in 0..count."""
    return quantile(open_unit(words(k, 0, count)))


def _matrix(shape, layout):
    if layout == "LAYOUT_KERAS":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def orthogonal(k: bytes, shape, layout, gain=1.0) -> np.ndarray:
    """Section S.4: the full tensor, f64."""
    rows, cols = _matrix(shape, layout)
    m_draws = draws(k, rows * cols).reshape(rows, cols)
    a = m_draws.copy() if rows >= cols else m_draws.T.copy()
    m, n = a.shape
    vs, cs, betas = [], [], []
    for kk in range(n):
        alpha = a[kk, kk]
        sigma = 0.0
        for i in range(kk + 1, m):
            sigma = sigma + a[i, kk] * a[i, kk]
        norm = math.sqrt(alpha * alpha + sigma)
        if norm == 0.0:
            beta, c = 0.0, 0.0
        else:
            beta = -norm if alpha >= 0.0 else norm
            c = 2.0 / ((alpha - beta) * (alpha - beta) + sigma)
        v = a[kk:, kk].copy()
        v[0] = alpha - beta
        _reflect(a, kk, v, c, slice(kk + 1, n))
        vs.append(v)
        cs.append(c)
        betas.append(beta)
    q = np.eye(m, n)
    for kk in reversed(range(n)):
        _reflect(q, kk, vs[kk], cs[kk], slice(kk, n))
    signs = np.array([-1.0 if b < 0.0 else 1.0 for b in betas])
    t = q * signs
    if rows < cols:
        t = t.T
    return (t * gain).reshape(shape)


def _reflect(x, k, v, c, columns):
    """x[k:, columns] <- H x[k:, columns], each column's sum in row order."""
    block = x[k:, columns]
    s = np.zeros(block.shape[1])
    for i in range(block.shape[0]):
        s = s + v[i] * block[i]
    g = s * c
    for i in range(block.shape[0]):
        block[i] = block[i] - g * v[i]


def eye(shape, value=1.0) -> np.ndarray:
    """Section S.1."""
    out = np.zeros(shape)
    for i in range(min(shape)):
        out[i, i] = value
    return out


def dirac(shape, layout, groups=1) -> np.ndarray:
    """Section S.2."""
    out = np.zeros(shape)
    rank = len(shape)
    for index in np.ndindex(*shape):
        if layout == "LAYOUT_KERAS":
            o, i, kernel, sizes = index[-1], index[-2], index[:-2], shape[:-2]
            per = shape[-1] // groups
        else:
            o, i, kernel, sizes = index[0], index[1], index[2:], shape[2:]
            per = shape[0] // groups
        if i == o % per and all(kc == ks // 2 for kc, ks in zip(kernel, sizes)):
            out[index] = 1.0
    assert out.ndim == rank
    return out


def sparse(k: bytes, shape, layout, sparsity, std=0.01) -> np.ndarray:
    """Section S.3."""
    numel = shape[0] * shape[1]
    values = 0.0 + std * draws(k, numel)
    if layout == "LAYOUT_KERAS":
        rows, cols = shape[1], shape[0]
    else:
        rows, cols = shape
    z = min(math.ceil(sparsity * float(rows)), rows)
    selection = _Selection(k)
    for c in range(cols):
        perm = list(range(rows))
        for i in range(z):
            j = i + selection.below(rows - i)
            perm[i], perm[j] = perm[j], perm[i]
        for r in perm[:z]:
            flat = c * rows + r if layout == "LAYOUT_KERAS" else r * cols + c
            values[flat] = 0.0
    return values.reshape(shape)


class _Selection:
    """Sparse's selection words: indices 2^63, 2^63 + 1, ..."""

    def __init__(self, k):
        self.k, self.next, self.buffer = k, 2**63, []

    def below(self, n):
        while True:
            if not self.buffer:
                self.buffer = [int(w) for w in words(self.k, self.next, 256)][::-1]
                self.next += 256
            w = self.buffer.pop()
            if w < 2**64 - (2**64 % n):
                return w % n


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Section 9: little-endian bytes of f64 values in a dtype."""
    if dtype == "DTYPE_FLOAT64":
        return values.astype("<f8").tobytes()
    f32 = values.astype("<f4")
    if dtype == "DTYPE_FLOAT16":
        return f32.astype("<f2").tobytes()
    if dtype == "DTYPE_BFLOAT16":
        bits = f32.view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
        return rounded.astype("<u2").tobytes()
    return f32.tobytes()


def tensor(seed: int, spec: dict, defaults: dict) -> bytes:
    """The output bytes of one TensorSpec (proto3 JSON) of a request."""
    shape = [int(d) for d in spec["shape"]]
    layout = spec.get("layout", defaults.get("layout", "LAYOUT_TORCH"))
    dtype = spec.get("dtype", defaults.get("dtype", "DTYPE_FLOAT32"))
    k = key(seed, spec["name"])
    (scheme, params), *_ = spec["init"].items()
    if scheme == "orthogonal":
        full = orthogonal(k, shape, layout, params.get("gain", 1.0))
    elif scheme == "eye":
        full = eye(shape)
    elif scheme == "identity":
        full = eye(shape, params.get("gain", 1.0))
    elif scheme == "dirac":
        full = dirac(shape, layout, params.get("groups", 1))
    elif scheme == "sparse":
        full = sparse(k, shape, layout, params["sparsity"], params.get("std", 0.01))
    else:
        raise ValueError(f"init: not a structured scheme: {scheme}")
    if spec.get("permute"):
        full = np.transpose(full, spec["permute"])
    ranges = spec.get("slice", {}).get("dims", {}).get("ranges")
    if ranges:
        full = full[tuple(slice(int(r.get("start", 0)), int(r["stop"])) for r in ranges)]
    return encode(np.ascontiguousarray(full), dtype)


def _t(name, shape, init, **fields):
    return {"name": name, "shape": shape, "init": init, **fields}


F64, F32 = {"dtype": "DTYPE_FLOAT64"}, {"dtype": "DTYPE_FLOAT32"}
KERAS = {"layout": "LAYOUT_KERAS"}

# The committed cases: tall, wide, square, conv-shaped, both layouts, panel edges (the server
# groups 16 columns), every dtype, slices and permuted views.
REQUESTS = {
    "orthogonal_shapes": {"seed": 7, "tensors": [
        _t("square", [16, 16], {"orthogonal": {}}, **F64),
        _t("tall", [40, 12], {"orthogonal": {"gain": 2.0}}, **F64),
        _t("wide", [6, 30], {"orthogonal": {}}, **F64),
        _t("conv", [8, 3, 3, 3], {"orthogonal": {}}, **F64),
        _t("panels", [70, 35], {"orthogonal": {"gain": 0.5}}, **F64),
        _t("wide_panels", [33, 48], {"orthogonal": {}}, **F64),
        _t("column", [9, 1], {"orthogonal": {}}, **F64),
    ]},
    "orthogonal_keras": {"seed": 11, "layout": "LAYOUT_KERAS", "tensors": [
        _t("kernel", [3, 3, 4, 8], {"orthogonal": {}}, **F64),
        _t("dense", [12, 20], {"orthogonal": {"gain": 1.5}}, **F64),
        _t("torch_too", [12, 20], {"orthogonal": {}}, layout="LAYOUT_TORCH", **F64),
    ]},
    "orthogonal_dtypes_and_views": {"seed": 3, "tensors": [
        _t("f32", [24, 24], {"orthogonal": {}}, **F32),
        _t("f16", [24, 18], {"orthogonal": {}}, dtype="DTYPE_FLOAT16"),
        _t("bf16", [18, 24], {"orthogonal": {"gain": 3.0}}, dtype="DTYPE_BFLOAT16"),
        _t("sliced", [20, 10], {"orthogonal": {}}, slice={"dims": {"ranges": [
            {"start": 3, "stop": 9}, {"start": 2, "stop": 10}]}}, **F64),
        _t("permuted", [20, 10], {"orthogonal": {}}, permute=[1, 0], slice={"dims": {"ranges": [
            {"start": 1, "stop": 7}, {"start": 0, "stop": 20}]}}, **F64),
    ]},
    "eye_identity_dirac": {"seed": 1, "tensors": [
        _t("eye", [5, 7], {"eye": {}}),
        _t("eye_tall", [6, 3], {"eye": {}}, **F64),
        _t("identity", [7, 5], {"identity": {"gain": 0.5}}, **F64),
        _t("dirac1d", [6, 4, 3], {"dirac": {"groups": 2}}),
        _t("dirac2d", [4, 6, 3, 3], {"dirac": {}}, **F64),
        _t("dirac3d", [2, 2, 3, 2, 3], {"dirac": {}}),
        _t("dirac_keras", [3, 3, 4, 6], {"dirac": {"groups": 3}}, **KERAS),
        _t("dirac_sliced", [8, 8, 5, 5], {"dirac": {"groups": 2}}, slice={"dims": {"ranges": [
            {"start": 4, "stop": 8}, {"start": 0, "stop": 8}, {"start": 1, "stop": 4},
            {"start": 0, "stop": 5}]}}, dtype="DTYPE_BFLOAT16"),
    ]},
    "sparse": {"seed": 5, "tensors": [
        _t("half", [50, 20], {"sparse": {"sparsity": 0.3}}, **F64),
        _t("keras", [20, 50], {"sparse": {"sparsity": 0.1, "std": 0.5}}, **KERAS, **F64),
        _t("all_zero", [7, 4], {"sparse": {"sparsity": 1.0}}, **F64),
        _t("none_zero", [7, 4], {"sparse": {"sparsity": 0.0, "std": 1.0}}, **F64),
        _t("odd", [13, 9], {"sparse": {"sparsity": 0.33, "std": 2.0}}, **F32),
        _t("permuted", [30, 8], {"sparse": {"sparsity": 0.5}}, permute=[1, 0], **F32),
    ]},
}  # fmt: skip


def cases() -> dict:
    """The committed cases file: each request with every tensor's length and BLAKE3 digest."""
    out = []
    for name, request in REQUESTS.items():
        expect = []
        for spec in request["tensors"]:
            data = tensor(request["seed"], spec, request)
            digest = __import__("blake3").blake3(data).hexdigest()
            expect.append({"name": spec["name"], "byte_length": len(data), "blake3": digest})
        out.append({"case": name, "request": request, "expect": expect})
    return {
        "about": "Structured schemes of algorithm v1 (docs/ALGORITHM.md, 'Additions to "
        "algorithm v1'); digests from clients/python/tests/structured_ref.py",
        "cases": out,
    }


if __name__ == "__main__":
    import json
    import sys

    json.dump(cases(), sys.stdout, indent=1)
    sys.stdout.write("\n")
