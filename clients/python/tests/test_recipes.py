"""Recipes against the real transformers and torchvision: every parameter a model gets from the
server has the distribution the model's own init gives it, and every process gets the same bytes.

The model's own init is observed, not restated: while a model is built natively, every torch
init function (torch.nn.init.*, transformers' copies of them, Tensor.normal_) is wrapped to
record, per tensor, the last call that wrote it and its arguments.
"""

import inspect
import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

import transformers.initialization as hf_init
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.vision_transformer import ConvStemConfig

import weightinit
import weightinit.torch as wt
from weightinit.recipes import resolve

SEED = 20260101
TIMEOUT = 120
# Tensors from this many elements on have their sample stds compared (served vs native, 10%).
# Smaller ones must come from an init call that states its parameters, compared exactly.
MEASURABLE = 1024

# The distribution each torch init function draws from, as Describe names it.
_FAMILIES = {
    "normal_": "normal",
    "kaiming_normal_": "normal",
    "xavier_normal_": "normal",
    "trunc_normal_": "truncated_normal",
    "uniform_": "uniform",
    "kaiming_uniform_": "uniform",
    "xavier_uniform_": "uniform",
    "zeros_": "constant",
    "ones_": "constant",
    "constant_": "constant",
}


def _tiny_t5(**overrides):
    config = transformers.T5Config(
        num_layers=2, d_model=64, d_ff=128, d_kv=16, num_heads=4, vocab_size=512, **overrides
    )
    return transformers.T5ForConditionalGeneration(config)


def _bert_config():
    return transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=32,
    )


def _bert_with_a_head():
    """A transformers backbone inside a user's module: the head keeps its PyTorch default."""
    return nn.ModuleDict(
        {"backbone": transformers.BertModel(_bert_config()), "head": nn.Linear(64, 32)}
    )


class LayerZoo(transformers.PreTrainedModel):
    """A model keeping transformers' default _init_weights, with the layers its branches name
    (LSTM, MultiheadAttention with separate q/k/v, Conv2d, GroupNorm, BatchNorm) and one they do
    not (ConvTranspose3d: its PyTorch default)."""

    config_class = transformers.PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.lstm = nn.LSTM(32, 48)
        self.attention = nn.MultiheadAttention(64, 4, kdim=32, vdim=32)
        self.conv = nn.Conv2d(16, 32, 3)
        self.deconv = nn.ConvTranspose3d(8, 8, 3)
        self.norm = nn.GroupNorm(4, 32)
        self.batchnorm = nn.BatchNorm1d(32)
        self.post_init()


CASES = {
    "gpt2": (
        "hf",
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=32, bos_token_id=0,
                eos_token_id=0,
            )
        ),
    ),
    "llama": (
        "hf",
        lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, pad_token_id=0, tie_word_embeddings=False,
            )
        ),
    ),
    "bert": ("hf", lambda: transformers.BertForMaskedLM(_bert_config())),
    "hf_default_layers": (
        "hf",
        lambda: LayerZoo(transformers.PretrainedConfig(initializer_range=0.05)),
    ),
    "bert_with_a_head": ("hf", _bert_with_a_head),
    "t5": ("hf", _tiny_t5),
    "t5_gated_untied": (
        "hf",
        lambda: _tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    "resnet18": ("torchvision", lambda: torchvision.models.resnet18(num_classes=10)),
    "resnet18_zero_init_residual": (
        "torchvision",
        lambda: torchvision.models.resnet18(num_classes=10, zero_init_residual=True),
    ),
    "resnet_bottleneck_zero_init_residual": (
        "torchvision",
        lambda: torchvision.models.ResNet(
            Bottleneck, [1, 1, 1, 1], num_classes=10, zero_init_residual=True, width_per_group=16
        ),
    ),
    "vit": (
        "torchvision",
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
            num_classes=10,
        ),
    ),
    "vit_conv_stem_pre_logits": (
        "torchvision",
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128,
            num_classes=10, representation_size=64,
            conv_stem_configs=[ConvStemConfig(64, 3, 2), ConvStemConfig(64, 3, 2)],
        ),
    ),
}  # fmt: skip


def _key(tensor):
    # By memory, not object: nn.Parameter(t) is a new object over the same storage.
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


@contextmanager
def recorded_inits():
    """Yields {tensor key: (init function name, its bound arguments)}, the last init call that
    wrote each tensor while the context is open."""
    calls = {}

    def wrap(name, original):
        signature = inspect.signature(original)

        def recorder(*args, **kwargs):
            result = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            calls[_key(arguments.pop("tensor"))] = (name, arguments)
            return result

        return recorder

    tensor_normal = torch.Tensor.normal_

    def normal_method(self, mean=0.0, std=1.0, *, generator=None):
        result = tensor_normal(self, mean, std, generator=generator)
        calls[_key(self)] = ("normal_", {"mean": mean, "std": std})
        return result

    with pytest.MonkeyPatch.context() as patch:
        for name in _FAMILIES:
            original = getattr(torch.nn.init, name)
            recorder = wrap(name, original)
            # Some torch modules import the functions by name (MultiheadAttention does), and
            # transformers calls the originals it keeps: patch them all.
            for module_name in hf_init.TORCH_MODULES_TO_PATCH:
                module = sys.modules.get(module_name)
                if module is not None and getattr(module, name, None) is original:
                    patch.setattr(module, name, recorder)
            patch.setitem(hf_init.TORCH_INIT_FUNCTIONS, name, recorder)
        patch.setattr(torch.Tensor, "normal_", normal_method)
        yield calls


def _padding_rows(model):
    """{parameter name: padding_idx} of the embeddings that zero a row of their weight."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {
        names[id(module.weight)]: module.padding_idx
        for module in model.modules()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None
    }


def _without_row(tensor, row):
    return tensor if row is None else torch.cat([tensor[:row], tensor[row + 1 :]])


def _check_parameter(name, native, served, resolved, call):
    """Served values against the native ones, given the native init call (None: not recorded)."""
    if call is None:
        assert bool((native == native.flatten()[0]).all()), f"{name}: no init call recorded"
        family = "constant"  # a tensor its constructor fills, e.g. torch.zeros
    else:
        family = _FAMILIES[call[0]]
    assert resolved["distribution"] == family, f"{name}: {resolved}, natively {call}"
    if family == "constant":
        assert torch.equal(served, native), name
        return

    function, arguments = call
    stated = {
        "normal_": {"mean": "mean", "std": "std"},
        "trunc_normal_": {"mean": "mean", "std": "std", "a": "truncLow", "b": "truncHigh"},
        "uniform_": {"a": "low", "b": "high"},
    }.get(function, {})
    for argument, field in stated.items():
        assert math.isclose(resolved[field], arguments[argument], rel_tol=1e-12), (
            f"{name}: {field} {resolved[field]}, natively {function}({argument}={arguments[argument]})"
        )
    if native.numel() >= MEASURABLE:
        ratio = served.double().std() / native.double().std()
        assert 0.9 < ratio < 1.1, f"{name}: std served / native = {ratio:.3f} ({function})"
    else:
        assert stated, f"{name}: {native.numel()} elements are too few to compare ({function})"


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_has_the_native_distribution(case, target):
    recipe, build = CASES[case]
    torch.manual_seed(0)
    with recorded_inits() as calls:
        native = build()
    served = build()
    wt.init_module(served, SEED, target, recipe=recipe, timeout=TIMEOUT)
    headers = weightinit.describe(
        wt.build_request(served, SEED, recipe=recipe), target, timeout=TIMEOUT
    )
    padding = _padding_rows(native)

    served_params = dict(served.named_parameters())
    assert list(served_params) == list(headers)
    for name, param in native.named_parameters():
        row = padding.get(name)
        if row is not None:
            # The native row is zeroed after the draw; the service serves the whole tensor's
            # draw (docs/RECIPES.md).
            assert not param[row].any(), name
        _check_parameter(
            name,
            _without_row(param.detach(), row),
            _without_row(served_params[name].detach(), row),
            headers[name]["resolved"],
            calls.get(_key(param)),
        )


def test_rules_override_the_recipe_parameter_by_parameter():
    model = CASES["gpt2"][1]()
    spec_for = resolve("hf", model)
    owners = {
        name: (module, local)
        for module_name, module in model.named_modules()
        for local, _ in module.named_parameters(recurse=False)
        for name in [f"{module_name}.{local}" if module_name else local]
    }
    rules = [
        ("transformer.h.0.attn.c_attn.weight", {"xavierUniform": {}}),
        ("transformer.h.1.mlp.c_proj.weight", {"fanIn": "7"}),
    ]
    request = wt.build_request(model, SEED, rules, recipe="hf")
    for spec in request["tensors"]:
        recipe_spec = spec_for(*owners[spec["name"]], spec["name"])
        if spec["name"] == "transformer.h.0.attn.c_attn.weight":
            assert spec["init"] == {"xavierUniform": {}}
        elif spec["name"] == "transformer.h.1.mlp.c_proj.weight":
            assert spec["init"] == recipe_spec["init"] and spec["fanIn"] == "7"
        else:
            assert {key: spec[key] for key in recipe_spec} == recipe_spec, spec["name"]


def test_the_printed_request_fetches_the_same_weights(target):
    """build_request's JSON is all another client needs: fetched as is, it gives init_module's
    bytes."""
    model = CASES["vit"][1]()
    wt.init_module(model, SEED, target, recipe="torchvision", timeout=TIMEOUT)
    text = json.dumps(wt.build_request(model, SEED, recipe="torchvision"))
    arrays = weightinit.fetch(json.loads(text), target, timeout=TIMEOUT)
    for name, param in model.named_parameters():
        assert torch.equal(torch.from_numpy(arrays[name]), param.detach()), name


CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[4])
from test_recipes import CASES
import weightinit.torch as wt
torch.manual_seed(int(sys.argv[2]))  # each process starts from different torch values
digests = {}
for case in ("gpt2", "llama", "resnet18", "vit"):
    recipe, build = CASES[case]
    model = build()
    wt.init_module(model, int(sys.argv[3]), sys.argv[1], recipe=recipe, timeout=120)
    digests[case] = {n: wt.tensor_digest(p) for n, p in model.named_parameters()}
print(json.dumps(digests))
"""


def test_separate_processes_get_identical_bytes(target):
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                target,
                str(torch_seed),
                str(SEED),
                str(Path(__file__).parent),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for torch_seed in (1, 2)
    ]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    first, second = (json.loads(output) for output in outputs)
    assert first == second
    for case, digests in first.items():
        recipe, build = CASES[case]
        model = build()
        request = wt.build_request(model, SEED, recipe=recipe)
        served = weightinit.digest(request, target, timeout=TIMEOUT)
        # init_module zeroes padding rows after the fetch, so those tensors differ from the
        # server's digest by design; every other tensor is exactly what the server serves.
        padded = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and module.padding_idx is not None
        }
        assert padded <= set(digests), case
        assert {n: d for n, d in digests.items() if n not in padded} == {
            n: d for n, d in served.items() if n not in padded
        }, case


def test_unknown_recipes_and_families_are_named():
    model = CASES["gpt2"][1]()
    with pytest.raises(ValueError, match=r"recipe: .*'keras'"):
        wt.build_request(model, SEED, recipe="keras")
    with pytest.raises(ValueError, match=r"recipe: 'hf' .*Linear contains none"):
        resolve("hf", nn.Linear(4, 4))
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"recipe: 'hf' has no recipe for ViTModel .*'vit'"):
        resolve("hf", vit)
    with pytest.raises(ValueError, match=r"recipe: 'torchvision' has no recipe for SqueezeNet"):
        resolve("torchvision", torchvision.models.squeezenet1_1(num_classes=10))
    with pytest.raises(ValueError, match=r"recipe: 'torchvision' .*Sequential contains neither"):
        resolve("torchvision", nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_zero_init_residual_of_a_meta_resnet_must_be_stated():
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match=r"recipe: 'torchvision' .*zero_init_residual"):
        resolve("torchvision", model)
    for stated in (False, True):
        model.zero_init_residual = stated
        spec_for = resolve("torchvision", model)
        spec = spec_for(model.layer1[0].bn2, "weight", "layer1.0.bn2.weight")
        assert spec == {"init": {"zeros" if stated else "ones": {}}}
