"""weightinit.torch runs each model's own init and serves only its random draws.

For real models from small configs (transformers, torchtitan, torchvision, timm, PEFT and a
nanoGPT-style model that initializes in its constructor) the native init runs twice with
different torch seeds while a spy records every draw it makes, at the level torch draws
(Tensor.normal_ / uniform_ with the bounds torch computed, truncated normals by their bounds).
Then, for every parameter and buffer:
- elements the native init makes the same in both runs (constants, padding rows, RoPE caches)
  are bit-equal in weightinit's init;
- a tensor the native init draws is served with the distribution the native call drew from,
  its parameters equal to 1e-12 (read back from Describe, what the engine resolved);
- weightinit's bytes do not depend on torch's RNG state.
"""

import inspect
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import weightinit
import weightinit.torch as wt

SEED = 20261206
TOL = 1e-12


class NativeSpy(TorchFunctionMode):
    """Records the last draw into each tensor's memory, {data_ptr: (kind, *params)}, following
    draws into temporaries through the ops that rearrange them and the copy into a parameter
    (torchtitan's fused wqkv)."""

    def __init__(self):
        super().__init__()
        self.draws = {}
        self._labels = {}  # id(temporary) -> (tensor, draw)
        self._inside = 0
        self._patches = []

    def __enter__(self):
        self._wrap(
            torch.nn.init, "_no_grad_trunc_normal_", lambda t, m, s, a, b, *_, **__: (m, s, a, b)
        )
        weight_init = pytest.importorskip("timm.layers.weight_init")
        self._wrap(weight_init, "_trunc_normal_", lambda t, m, s, a, b: (m, s, a, b))
        self._wrap(
            weight_init,
            "trunc_normal_tf_",
            lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: (mean, std, mean + a * std, mean + b * std),
        )
        return super().__enter__()

    def __exit__(self, *exc):
        for module, name, original in self._patches:
            setattr(module, name, original)
        return super().__exit__(*exc)

    def _record(self, tensor, draw):
        self.draws[tensor.data_ptr()] = draw
        self._labels[id(tensor)] = (tensor, draw)

    def _wrap(self, module, name, params):
        original = getattr(module, name)
        spy = self

        def wrapper(tensor, *args, **kwargs):
            if not spy._inside:  # timm's trunc_normal_tf_ calls _trunc_normal_
                spy._record(tensor, ("trunc", *map(float, params(tensor, *args, **kwargs))))
            spy._inside += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                spy._inside -= 1

        self._patches.append((module, name, original))
        setattr(module, name, wrapper)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self._inside:
            return func(*args, **kwargs)
        if "tensor" in kwargs and name in ("normal_", "uniform_", "kaiming_uniform_"):
            # torch.nn.init's functions that reach modes through handle_torch_function
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            p = bound.arguments
            if name == "kaiming_uniform_":
                fan = torch.nn.init._calculate_correct_fan(p["tensor"], p["mode"])
                bound_ = math.sqrt(3.0) * torch.nn.init.calculate_gain(p["nonlinearity"], p["a"])
                bound_ /= math.sqrt(fan)
                self._record(p["tensor"], ("uniform", -bound_, bound_))
            else:
                values = (p["mean"], p["std"]) if name == "normal_" else (p["a"], p["b"])
                self._record(p["tensor"], (name[:-1], *map(float, values)))
        elif name in ("normal_", "uniform_") and args:
            keys = ("mean", "std") if name == "normal_" else ("from", "to")
            values = [
                args[i + 1] if len(args) > i + 1 else kwargs.get(key, (0.0, 1.0)[i])
                for i, key in enumerate(keys)
            ]
            self._record(args[0], (name[:-1], *map(float, values)))
        result = func(*args, **kwargs)
        sources = (args[1:], kwargs) if name == "copy_" else (args, kwargs)
        leaves = [t for t in tree_leaves(sources) if isinstance(t, torch.Tensor)]
        labels = {self._labels.get(id(t), (None, None))[1] for t in leaves}
        if not leaves or len(labels) != 1 or None in labels:
            pass
        elif name == "copy_":
            self.draws[args[0].data_ptr()] = labels.pop()
        else:
            label = labels.pop()
            for out in tree_leaves(result):
                if isinstance(out, torch.Tensor):
                    self._labels[id(out)] = (out, label)
        return result


def _tensors(model):
    return dict((*model.named_parameters(), *model.named_buffers()))


def _same(a, b):
    """Elementwise: equal, or both NaN."""
    if a.is_complex():
        return _same(torch.view_as_real(a), torch.view_as_real(b)).all(-1)
    return (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b


def _resolved(model):
    request = wt.build_request(model, SEED)
    described = weightinit.describe(request, "local")
    return {spec["name"]: described[spec["name"]]["resolved"] for spec in request["tensors"]}


def _matches(native, resolved):
    kind, *params = native
    close = lambda x, y: math.isclose(x, y, rel_tol=TOL, abs_tol=TOL)
    if kind == "normal":
        return resolved["distribution"] == "normal" and all(
            map(close, params, (resolved["mean"], resolved["std"]))
        )
    if kind == "uniform":
        return resolved["distribution"] == "uniform" and all(
            map(close, params, (resolved["low"], resolved["high"]))
        )
    fields = (resolved["mean"], resolved["std"], resolved["truncLow"], resolved["truncHigh"])
    return resolved["distribution"] == "truncated_normal" and all(map(close, params, fields))


def check_own_init(native, ours):
    """native(): a model initialized by its own code; ours(): the same model initialized by
    weightinit (target "local"). Compares them as the module docstring says."""
    spy = NativeSpy()
    torch.manual_seed(1)
    with spy:
        first = native()
    torch.manual_seed(2)
    second = native()
    torch.manual_seed(3)
    served = ours()
    torch.manual_seed(4)
    again = ours()
    a, b, c, d = map(_tensors, (first, second, served, again))
    assert list(c) == list(a)
    resolved = _resolved(served)
    drawn = {name: spy.draws.get(t.data_ptr()) for name, t in a.items()}
    checked = 0
    for name, native_value in a.items():
        value = c[name].detach()
        assert torch.equal(value, d[name]), f"{name} depends on torch's RNG state"
        assert value.dtype == native_value.dtype and value.shape == native_value.shape, name
        same = _same(native_value.detach(), b[name].detach())
        assert torch.equal(value[same], native_value.detach()[same]), f"{name}: constants differ"
        if same.all():
            assert name not in resolved, f"{name} is served but the native init is constant"
            continue
        assert name in resolved, f"{name} is random natively but not served"
        assert drawn[name] is not None, f"the spy saw no draw into {name}"
        assert _matches(drawn[name], resolved[name]), (name, drawn[name], resolved[name])
        checked += 1
    assert checked, "no drawn tensor was compared"
    return resolved


def _from_meta(build):
    def ours():
        with torch.device("meta"):
            model = build()
        model.to_empty(device="cpu")
        wt.init_module(model, SEED, "local")
        return model

    return ours


def _recorded(build, device="cpu"):
    def ours():
        with wt.recording(), torch.device(device):
            model = build()
        model.to_empty(device="cpu")
        wt.init_module(model, SEED, "local")
        return model

    return ours


SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "pad_token_id": 3,
}
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen2_untied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=8),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_transformers_causal_lms(family):
    def build():
        return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())

    resolved = check_own_init(build, _from_meta(build))
    assert any(r["distribution"] == "normal" for r in resolved.values())


def test_transformers_t5_scales_by_its_own_factors():
    config = transformers.T5Config(
        num_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4, vocab_size=96
    )

    def build():
        return transformers.T5ForConditionalGeneration(config)

    resolved = check_own_init(build, _from_meta(build))
    assert len({r["std"] for r in resolved.values()}) >= 3  # T5 scales each kind differently


def test_torchtitan_llama3_debug_model_with_its_rope_cache():
    llama3 = pytest.importorskip("torchtitan.models.llama3")

    def native():
        model = llama3._debugmodel("flex").build()
        model.init_states()
        return model

    def ours():
        with torch.device("meta"):
            model = llama3._debugmodel("flex").build()
        model.to_empty(device="cpu")
        wt.init_module(model, SEED, "local")
        return model

    resolved = check_own_init(native, ours)
    stds = {r["std"] for r in resolved.values() if r["distribution"] == "truncated_normal"}
    assert len(stds) >= 6  # depth-scaled projections


def test_torchvision_resnet18_recorded_in_its_constructor():
    torchvision = pytest.importorskip("torchvision")
    check_own_init(
        lambda: torchvision.models.resnet18(num_classes=10),
        _recorded(lambda: torchvision.models.resnet18(num_classes=10), "meta"),
    )


def test_timm_vit_recorded_in_its_constructor():
    timm = pytest.importorskip("timm")

    def build():
        return timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            depth=2,
            num_classes=10,
            init_values=1e-5,
        )

    check_own_init(build, _recorded(build))


def test_peft_lora_recorded_with_its_base_model():
    peft = pytest.importorskip("peft")

    def build():
        base = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
        return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    resolved = check_own_init(build, _recorded(build, "meta"))
    assert any("lora_A" in name for name in resolved)
    assert not any("lora_B" in name for name in resolved)  # zeros, as PEFT makes them


class NanoGPT(nn.Module):
    """nanoGPT's shape: draws in the constructor, a depth-scaled projection, a tied head, a
    computed buffer and a parameter made with torch.ones."""

    def __init__(self, n_layer=2, d=32, vocab=96):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(16, d)
        self.h = nn.ModuleList(
            nn.ModuleDict(
                {"ln": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)}
            )
            for _ in range(n_layer)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        self.gain = nn.Parameter(torch.ones(d) * 0.5)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cpu").float() / d))
        self.register_buffer("inv_freq", inv_freq.to(self.gain.device), persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)


def test_nanogpt_recorded_in_its_constructor():
    check_own_init(NanoGPT, _recorded(NanoGPT))


def test_a_buffer_computed_on_meta_while_recording_is_refused_by_name():
    class Rope(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4)))

    with wt.recording(), torch.device("meta"):
        model = Rope()
    model.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"inv_freq: its value was computed on the meta device"):
        wt.init_module(model, SEED, "local")


class TimmInits(nn.Module):
    """timm's initializers, each into a layer of its own."""

    def __init__(self):
        super().__init__()
        weight_init = pytest.importorskip("timm.layers.weight_init")
        self.tf = nn.Linear(64, 96)
        self.scaled = nn.Linear(64, 96)
        self.lecun = nn.Conv2d(8, 16, 3)
        weight_init.trunc_normal_tf_(self.tf.weight, mean=0.01, std=0.05, a=-1.5, b=2.5)
        weight_init.variance_scaling_(self.scaled.weight, 2.0, "fan_avg", "uniform")
        weight_init.variance_scaling_(self.scaled.bias.view(8, 12), 0.5, "fan_out", "normal")
        weight_init.lecun_normal_(self.lecun.weight)


def test_timm_initializers_recorded():
    check_own_init(TimmInits, _recorded(TimmInits))
