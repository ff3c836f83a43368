"""weightinit.torch.init_module() on real models: transformers Llama and GPT-2 (small configs,
tied embeddings, from the meta device, their own init), torchvision's resnet18, torch.compile'd
and prefixed models. Everything is checked against a plain single-process init on the real
server."""

import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import weightinit
import weightinit.torch as wt

SEED = 777
TIMEOUT = 60


def _values(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _assert_same(model, expected):
    values = _values(model)
    assert list(values) == list(expected)
    for name, value in values.items():
        assert torch.equal(value, expected[name]), name


def _init_quietly(model, target, **kwargs):
    """init_module, returning the buffers its warning names (none if it does not warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wt.init_module(model, SEED, target, timeout=TIMEOUT, **kwargs)
    return [str(w.message) for w in caught if "init_module leaves buffers" in str(w.message)]


def _from_meta(build):
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    return model


def small_decoder(family, **config):
    """A transformers causal LM of `family` ("Llama", "Qwen2"): 2 layers, 4 heads, 2 KV heads."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **config
    )
    return getattr(transformers, f"{family}ForCausalLM")(config)


def llama():
    return small_decoder(
        "Llama",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    "build, head, embedding",
    [
        (llama, "lm_head.weight", "model.embed_tokens.weight"),
        (gpt2, "lm_head.weight", "transformer.wte.weight"),
    ],
    ids=["llama", "gpt2"],
)
def test_transformers_from_meta_tie_again_and_match_a_plain_init(build, head, embedding, target):
    plain = build()
    _init_quietly(plain, target)

    model = _from_meta(build)
    assert model.get_parameter(head) is not model.get_parameter(embedding)  # to_empty untied
    assert _init_quietly(model, target) == []  # every buffer rebuilt (Llama's rotary frequencies)
    assert model.get_parameter(head) is model.get_parameter(embedding)
    _assert_same(model, _values(plain))
    for name, buffer in plain.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name

    request = wt.build_request(model, SEED)
    names = [spec["name"] for spec in request["tensors"]]
    assert embedding in names and head not in names  # the shared tensor is fetched once
    server = weightinit.digest(request, target, timeout=TIMEOUT)
    assert {n: wt.tensor_digest(model.get_parameter(n)) for n in server} == server


def test_resnet18_from_meta_rebuilds_batchnorm_statistics(target):
    torchvision = pytest.importorskip("torchvision")

    def build():
        return torchvision.models.resnet18(weights=None, num_classes=10)

    plain = build()
    _init_quietly(plain, target)
    model = _from_meta(build)
    assert _init_quietly(model, target) == []  # every buffer is a norm statistic
    _assert_same(model, _values(plain))
    for name, buffer in model.named_buffers():
        expected = torch.ones_like(buffer) if name.endswith("running_var") else 0 * buffer
        assert torch.equal(buffer, expected), name


def test_meta_parameters_are_refused_with_what_to_do(target):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(
        ValueError, match=r"0\.weight, 0\.bias.* meta device: call module\.to_empty"
    ):
        wt.init_module(model, SEED, target)


def test_lazy_parameters_are_refused(target):
    with pytest.raises(ValueError, match=r"0\.weight.*forward pass"):
        wt.init_module(nn.Sequential(nn.LazyLinear(3)), SEED, target)


def mlp():
    return nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_compiled_model_gets_the_unwrapped_weights(target):
    plain = mlp()
    wt.init_module(plain, SEED, target, timeout=TIMEOUT)
    compiled = torch.compile(mlp())
    assert next(iter(dict(compiled.named_parameters()))) == "_orig_mod.0.weight"
    returned = wt.init_module(compiled, SEED, target, timeout=TIMEOUT)
    assert list(returned) == [name for name, _ in compiled.named_parameters()]
    drawn = [name for name in _values(plain) if ".1." not in f".{name}"]  # LayerNorm: constants
    assert [s["name"] for s in wt.build_request(compiled, SEED)["tensors"]] == drawn
    for param, expected in zip(compiled.parameters(), plain.parameters()):
        assert torch.equal(param, expected)


def test_checkpoint_wrapper_leaves_the_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = mlp()
    model[0] = checkpoint_wrapper(model[0])
    assert "0._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
    names = [spec["name"] for spec in wt.build_request(model, SEED)["tensors"]]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_submodule_named_module_is_not_a_wrapper():
    model = nn.Sequential()
    model.add_module("module", nn.Linear(2, 2))
    assert wt.build_request(model, SEED)["tensors"][0]["name"] == "module.weight"


def test_prefix_namespaces_a_model(target):
    actor, critic, again = mlp(), mlp(), mlp()
    wt.init_module(actor, SEED, target, prefix="actor")
    wt.init_module(critic, SEED, target, prefix="critic")
    wt.init_module(again, SEED, target, prefix="actor")
    request = wt.build_request(actor, SEED, prefix="actor")
    assert [s["name"] for s in request["tensors"]][:2] == ["actor.0.weight", "actor.0.bias"]
    assert not torch.equal(actor[0].weight, critic[0].weight)
    _assert_same(again, _values(actor))
    # Rules match the names inside the namespace.
    rules = [("0.weight", {"zeros": {}})]
    zeroed = wt.build_request(actor, SEED, rules, prefix="actor")["tensors"][0]
    assert zeroed["init"] == {"zeros": {}}


@pytest.mark.parametrize("prefix", ["", "actor.", 3])
def test_prefix_is_checked(prefix):
    with pytest.raises(ValueError, match="prefix"):
        wt.build_request(mlp(), SEED, prefix=prefix)
