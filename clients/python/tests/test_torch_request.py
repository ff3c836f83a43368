"""weightinit.torch.build_request(): the draws of a model's init (PyTorch's layer defaults for
plain torch layers), names, rules, dtypes and sharding plans."""

import re

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import weightinit
import weightinit.torch as wt


def _specs(module, **kwargs):
    request = wt.build_request(module, 42, **kwargs)
    weightinit.to_message(request)  # every request built is a valid GenerateRequest
    return {spec["name"]: spec for spec in request["tensors"]}


def test_mlp_gets_pytorch_defaults():
    specs = _specs(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)))
    assert list(specs) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert specs["0.weight"] == {
        "name": "0.weight",
        "shape": [256, 784],
        "dtype": "DTYPE_FLOAT32",
        "init": {"torchDefault": {}},
    }
    assert specs["0.bias"]["init"] == {"torchDefaultBias": {}} and specs["0.bias"]["fanIn"] == "784"
    assert specs["2.bias"]["fanIn"] == "256"


def test_conv_norm_and_embedding_defaults():
    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 8, (3, 5)),
            "deconv": nn.ConvTranspose1d(4, 6, 3, groups=2),
            "bn": nn.BatchNorm2d(8),
            "gn": nn.GroupNorm(2, 8),
            "ln": nn.LayerNorm(8),
            "emb": nn.Embedding(10, 4),
        }
    )
    specs = _specs(model)
    assert specs["conv.bias"]["fanIn"] == str(3 * 3 * 5)
    assert specs["deconv.weight"]["shape"] == [4, 3, 3]
    assert specs["deconv.bias"]["fanIn"] == str(3 * 3)  # weight.shape[1] * kernel, as torch
    for norm in ("bn", "gn", "ln"):  # constants: written, not served
        assert f"{norm}.weight" not in specs and f"{norm}.bias" not in specs
    assert specs["emb.weight"]["init"] == {"normal": {"mean": 0.0, "std": 1.0}}


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.proj = nn.Linear(3, 3)


def test_parameters_no_init_code_writes_are_named():
    with pytest.raises(ValueError, match=r"(?s)scale: no init code writes it.*\(.scale., "):
        wt.build_request(Custom(), 1)


def test_rules_glob_regex_and_overrides():
    rules = [
        ("proj.weight", {"xavierNormal": {"gain": 2.0}}),
        (re.compile(r"^sc"), {"init": {"constant": {"value": 0.5}}, "layout": "LAYOUT_KERAS"}),
        ("*.bias", {"fan_in": "7"}),
    ]
    specs = _specs(Custom(), rules=rules)
    assert (
        specs["scale"]["init"] == {"constant": {"value": 0.5}}
        and specs["scale"]["layout"] == "LAYOUT_KERAS"
    )
    assert specs["proj.weight"]["init"] == {"xavierNormal": {"gain": 2.0}}
    assert (
        specs["proj.bias"]["init"] == {"torchDefaultBias": {}}
        and specs["proj.bias"]["fanIn"] == "7"
    )


def test_first_matching_rule_wins():
    rules = [("*", {"zeros": {}}), ("scale", {"ones": {}})]
    assert _specs(Custom(), rules=rules)["scale"]["init"] == {"zeros": {}}


def test_dtype_follows_the_parameter_unless_given():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    assert {s["dtype"] for s in _specs(model).values()} == {"DTYPE_BFLOAT16"}
    assert {s["dtype"] for s in _specs(model, dtype=torch.float64).values()} == {"DTYPE_FLOAT64"}
    with pytest.raises(ValueError, match="weight"):
        wt.build_request(model, 1, dtype=torch.int32)


def test_tied_parameters_appear_once():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    assert list(_specs(model)) == ["0.weight"]


def test_default_plan_shards_dim_0_and_sends_scalars_whole():
    model = Custom()
    model.register_parameter("temperature", nn.Parameter(torch.tensor(1.0)))
    rules = [("scale", {"ones": {}}), ("temperature", {"ones": {}})]
    specs = _specs(model, rules=rules, plan=wt.shard_plan(1, 4))
    assert specs["proj.weight"]["slice"] == {"shard": {"dim": 0, "index": 1, "count": 4}}
    assert "slice" not in specs["temperature"]


@pytest.mark.parametrize("rank, world_size", [(0, None), (None, 2), (2, 2), (-1, 2)])
def test_rank_and_world_size_are_checked(rank, world_size):
    with pytest.raises(ValueError, match="rank"):
        wt.init_module(nn.Linear(2, 2), 1, "127.0.0.1:1", rank=rank, world_size=world_size)


def test_tensor_digest_hashes_the_elements_bytes():
    import blake3

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert (
        wt.tensor_digest(t.t()) == blake3.blake3(t.t().contiguous().numpy().tobytes()).hexdigest()
    )
    bits = torch.tensor([1.0, -2.0], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert (
        wt.tensor_digest(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
        == blake3.blake3(bits).hexdigest()
    )


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "x"])
def test_seeds_outside_u64_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed: must be in 0\.\.2\*\*64-1, got"):
        wt.build_request(nn.Linear(2, 2), seed)


def test_largest_seed_and_its_string_form_are_accepted():
    assert wt.build_request(nn.Linear(2, 2), 2**64 - 1)["seed"] == 2**64 - 1
    assert wt.build_request(nn.Linear(2, 2), "18446744073709551615")["seed"] == 2**64 - 1


@pytest.mark.parametrize(
    "rule, message",
    [
        (("*", {"zeros": {}, "fanIn": "3"}), r"rules\[0\] \('\*'\): mixes scheme keys \['zeros'\]"),
        (("*", {"fan_inn": "3"}), r"\['fan_inn'\] are neither schemes nor TensorSpec fields"),
        (("*", {"shape": [3]}), r"\['shape'\] cannot change for a torch parameter"),
        (("*", {"permute": [1, 0]}), r"\['permute'\] cannot change for a torch parameter"),
        (("*", {}), "must be a scheme or TensorSpec fields"),
        (("*",), "must be a \\(pattern, value\\) pair"),
    ],
)
def test_unusable_rules_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        wt.build_request(Custom(), 1, rules=[rule])


def test_rules_match_names_without_wrappers_and_plans_get_them_too():
    inner = nn.Sequential(nn.Linear(3, 2))
    wrapped = torch.compile(inner)
    seen = []

    def plan(name, param):
        seen.append(name)

    specs = _specs(wrapped, rules=[("0.bias", {"zeros": {}})], plan=plan)
    assert list(specs) == ["0.weight", "0.bias"] and seen == ["0.weight", "0.bias"]
    assert specs["0.bias"]["init"] == {"zeros": {}}


def test_shards_are_keyed_by_parameter_name(target):
    model = nn.Sequential(nn.Linear(4, 4))
    shards = wt.init_module(model, 1, target, rank=0, world_size=2, prefix="p")
    assert list(shards) == ["0.weight", "0.bias"] and shards["0.weight"].shape == (2, 4)


def test_sharding_with_a_plan_reads_shapes_only_so_meta_is_fine(target):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6))
    shards = wt.init_module(model, 1, target, rank=1, world_size=2)
    assert shards["0.weight"].shape == (3, 4) and model[0].weight.is_meta


def test_a_rule_may_rename_the_tensor_as_for_jax_flax_and_keras():
    rules = [("0.weight", {"name": "shared.weight"})]
    specs = _specs(nn.Sequential(nn.Linear(3, 2)), rules=rules)
    assert list(specs) == ["shared.weight", "0.bias"]
    assert specs["shared.weight"]["init"] == {"torchDefault": {}}
