"""A small transformer (embedding, multi-head attention, MLP, RMSNorm, output head) in Flax NNX
and its Linen twin, sharded 2 x 4 as Flax's guides do (jax.set_mesh, partitioning metadata,
Linen logical axis rules), initialized by weightinit.flax against the real server and compared
with Flax's own init of the same models: distributions, shardings and every device's block."""

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import weightinit.flax as wf
from weightinit import _blocks

SEED = 2026
NOWHERE = "127.0.0.1:1"
WIDTH, HEADS, VOCAB, HIDDEN = 64, 4, 128, 128
inits = jax.nn.initializers  # what nnx.initializers and nn.initializers re-export
# (initializer, sharding names) of every parameter the models declare one for.
DECLARED = {
    "embed": (inits.normal(0.02), ("model", None)),
    "norm": (inits.ones, ("model",)),
    "attn": (inits.lecun_normal(), (None, "model")),
    "up": (inits.he_uniform(), ("data", "model")),
    "up_bias": (inits.constant(0.1), ("model",)),
    "down": (inits.glorot_normal(), ("model", "data")),
    "head": (inits.truncated_normal(0.05), (None, "model")),
}
LOGICAL_RULES = (("vocab", "model"), ("embed", None))


def nnx_init(key):
    init, names = DECLARED[key]
    return nnx.with_partitioning(init, names)


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, embedding_init=nnx_init("embed"), rngs=rngs)
        self.norm = nnx.RMSNorm(WIDTH, scale_init=nnx_init("norm"), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            HEADS, WIDTH, kernel_init=nnx_init("attn"), decode=False, rngs=rngs
        )
        self.up = nnx.Linear(
            WIDTH, HIDDEN, kernel_init=nnx_init("up"), bias_init=nnx_init("up_bias"), rngs=rngs
        )
        self.down = nnx.Linear(HIDDEN, WIDTH, kernel_init=nnx_init("down"), rngs=rngs)
        self.head = nnx.Linear(
            WIDTH, VOCAB, kernel_init=nnx_init("head"), use_bias=False, rngs=rngs
        )

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(self.norm(h))
        return self.head(h + self.down(jax.nn.gelu(self.up(h))))


def linen_init(key):
    init, names = DECLARED[key]
    if key == "embed":  # the logical route: names resolved by LOGICAL_RULES
        return nn.with_logical_partitioning(init, ("vocab", "embed"))
    return nn.with_partitioning(init, names)


class LinenTransformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, WIDTH, embedding_init=linen_init("embed"), name="embed")(tokens)
        normed = nn.RMSNorm(scale_init=linen_init("norm"), name="norm")(h)
        attn = nn.MultiHeadDotProductAttention(HEADS, kernel_init=linen_init("attn"), name="attn")
        h = h + attn(normed)
        up = nn.Dense(
            HIDDEN, kernel_init=linen_init("up"), bias_init=linen_init("up_bias"), name="up"
        )
        down = nn.Dense(WIDTH, kernel_init=linen_init("down"), name="down")
        head = nn.Dense(VOCAB, kernel_init=linen_init("head"), use_bias=False, name="head")
        return head(h + down(jax.nn.gelu(up(h))))


TOKENS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def whole(target):
    """{path: array} of the NNX model on one device: every tensor whole."""
    one = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        return flat(nnx.state(wf.init_params(lambda: Transformer(nnx.Rngs(0)), SEED, target)))


def flat(state):
    """{path: array} of an nnx.State or a (Linen) params tree, boxes unboxed."""
    if isinstance(state, nnx.State):
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(state))
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def check_like_flax(ours, theirs):
    """Each leaf has the declared distribution of Flax's own init of the same model: constants
    exactly, the std of every leaf of >= 4096 elements within 5% (attention kernels included)."""
    assert ours.keys() == theirs.keys()
    large = 0
    for path, leaf in ours.items():
        mine, flax_own = np.asarray(leaf, np.float64), np.asarray(theirs[path], np.float64)
        assert mine.shape == flax_own.shape, path
        if flax_own.std() == 0:
            np.testing.assert_array_equal(mine, flax_own, err_msg=path)
        elif mine.size >= 4096:
            large += 1
            assert abs(mine.std() / flax_own.std() - 1) < 0.05, (path, mine.std(), flax_own.std())
            assert abs(mine.mean() - flax_own.mean()) < 0.05 * flax_own.std(), path
    assert large == 8  # embedding, 4 attention kernels, up, down, head


def check_blocks(sharded, whole, specs, mesh):
    """Every leaf has its sharding, and every device's block equals the unsharded init's. A
    leaf declared without one (a Linen bias outside any box) is uncommitted, as Flax's own."""
    for path, leaf in sharded.items():
        if specs[path] == P() and not isinstance(leaf.sharding, NamedSharding):
            assert not leaf.committed, path
        else:
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, specs[path]), leaf.ndim), path
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(shard.data, np.asarray(whole[path])[shard.index])


def test_nnx_transformer_under_set_mesh(target, mesh, whole):
    with jax.set_mesh(mesh):
        model = wf.init_params(lambda: Transformer(nnx.Rngs(0)), SEED, target)
        flax_own = nnx.jit(lambda: Transformer(nnx.Rngs(0)))()
        assert model(TOKENS).shape == (2, 8, VOCAB)
    ours = flat(nnx.state(model, nnx.Param))
    theirs = flat(nnx.state(flax_own, nnx.Param))
    check_like_flax(ours, theirs)
    check_blocks(ours, whole, {path: leaf.sharding.spec for path, leaf in theirs.items()}, mesh)

    # The other routes of Flax's guides give the same: an abstract state from set_mesh (its
    # shardings on an AbstractMesh), nnx.get_abstract_model.
    with jax.set_mesh(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(nnx.Rngs(0))))
        state = wf.init_params(abstract, SEED, target, rules=[("*", {"zeros": {}})])
        assert nnx.merge(graphdef, state)(TOKENS).shape == (2, 8, VOCAB)
    assert flat(state)["up/kernel"].sharding == NamedSharding(mesh, P("data", "model"))
    # like="torch" has no default for kernels Flax reshapes: they are named, not guessed.
    with pytest.raises(
        ValueError, match=r"no initializer for attn/key/bias, attn/key/kernel, attn/out/kernel"
    ):
        wf.init_params(lambda: Transformer(nnx.Rngs(0)), SEED, NOWHERE, like="torch", mesh=mesh)
    _, abstract = nnx.get_abstract_model(lambda: Transformer(nnx.Rngs(0)), mesh)
    state = wf.init_params(abstract, SEED, target, rules=[("*", {"ones": {}})])
    assert flat(state)["attn/query/kernel"].sharding.spec == P(None, "model")


def test_linen_twin_logical_partitioning(target, mesh, whole):
    model = LinenTransformer()
    init_fn = functools.partial(model.init, jax.random.key(0), TOKENS)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        abstract = jax.eval_shape(init_fn)
        variables = wf.init_params(init_fn, SEED, target)
        shardings = jax.tree.map(lambda leaf: NamedSharding(mesh, spec_of(leaf)), abstract, is_leaf=is_box)  # fmt: skip
        flax_own = jax.jit(init_fn, out_shardings=shardings)()
        assert jax.jit(model.apply)(variables, TOKENS).shape == (2, 8, VOCAB)
    # Boxes stay, around the new values.
    assert isinstance(variables["params"]["up"]["kernel"], nn.Partitioned)
    ours = flat(variables)
    check_like_flax(ours, flat(flax_own))
    specs = {path: leaf.sharding.spec for path, leaf in flat(flax_own).items()}
    # Its parameters have the NNX model's paths, so the twin holds the NNX model's values.
    check_blocks(ours, {path: whole[path.removeprefix("params/")] for path in ours}, specs, mesh)


def is_box(node):
    return isinstance(node, nn.Partitioned)


def spec_of(leaf):
    """The PartitionSpec a Linen leaf declares: its box's names (logical ones by the rules)."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        return nn.logical_to_mesh_axes(leaf.names, LOGICAL_RULES)
    return leaf.get_partition_spec() if is_box(leaf) else P()


class JitTwin(nn.Module):
    """An attention block whose initializers are weightinit's (wrapping the declared ones), for
    jax.jit(model.init): explicit DenseGeneral projections, as MultiHeadDotProductAttention's,
    each with its own tensor name."""

    target: str

    def declared(self, name, key):
        init, names = DECLARED[key]
        served = wf.initializer(init, seed=SEED, target=self.target, name=name, sharding=P(*names))
        return nn.with_partitioning(served, names)

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, WIDTH, embedding_init=self.declared("embed/embedding", "embed"))(tokens)
        q, k, v = (
            nn.DenseGeneral((HEADS, WIDTH // HEADS), use_bias=False,
                            kernel_init=self.declared(f"attn/{name}/kernel", "attn"))(h)
            for name in ("query", "key", "value")
        )  # fmt: skip
        out = nn.DenseGeneral(
            WIDTH,
            axis=(-2, -1),
            use_bias=False,
            kernel_init=self.declared("attn/out/kernel", "attn"),
        )
        h = h + out(nn.dot_product_attention(q, k, v))
        return nn.Dense(VOCAB, use_bias=False, kernel_init=self.declared("head/kernel", "head"))(h)


def test_inside_jit_each_device_fetches_only_its_block(target, mesh, whole, monkeypatch):
    fetched = []

    def spy(seed, tensors, *args, **kwargs):
        fetched.extend((spec["name"], block) for spec, blocks in tensors for block in blocks)
        return real(seed, tensors, *args, **kwargs)

    real = _blocks.fetch_blocks
    monkeypatch.setattr(_blocks, "fetch_blocks", spy)
    with jax.set_mesh(mesh):
        variables = jax.jit(JitTwin(target).init)(jax.random.key(0), TOKENS)
    ours = flat(variables)
    # Each parameter holds the values of the NNX model's of that name (the flattened
    # [in, heads * head_dim] kernel DenseGeneral asks for has the fans LinearGeneral's has).
    names = {"params/Embed_0/embedding": "embed/embedding", "params/Dense_0/kernel": "head/kernel"}
    for i, projection in enumerate(("query", "key", "value", "out")):
        names[f"params/DenseGeneral_{i}/kernel"] = f"attn/{projection}/kernel"
    for path, leaf in ours.items():
        expected = np.asarray(whole[names[path]]).reshape(leaf.shape)
        np.testing.assert_array_equal(np.asarray(leaf), expected, err_msg=path)
        # (The out projection's [heads * head_dim, out] blocks reshape to a sharding of their own.)
        if names[path] != "attn/out/kernel":
            declared = NamedSharding(mesh, P(*DECLARED[names[path].split("/")[0]][1]))
            assert leaf.sharding.is_equivalent_to(declared, leaf.ndim), path
    # No device asked for a whole tensor: every fetch is the block of one of 4 or 8 devices.
    sizes = {name: np.asarray(whole[name]).size for name in names.values()}
    assert {name for name, _ in fetched} == set(sizes)
    for name, block in fetched:
        assert np.prod([stop - start for start, stop in block]) * 4 <= sizes[name], name
