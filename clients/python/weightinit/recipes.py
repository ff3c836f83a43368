"""Model recipes: the initialization a model family gives itself, as TensorSpec fields.

    spec_for = weightinit.recipes.resolve("hf", model)
    spec_for(model.transformer.h[0].attn.c_proj, "weight", "transformer.h.0.attn.c_proj.weight")
    # {"init": {"normal": {"mean": 0.0, "std": 0.01}}}: initializer_range / sqrt(2 * n_layer)

A recipe is a table transcribed from the library's own init code, branch by branch:
- "hf": transformers' `PreTrainedModel._init_weights` and the overrides of GPT-2, BERT and T5
  (checked against transformers 5.24). Every model that keeps the default `_init_weights`
  (Llama, Mistral, Qwen2/3 and most decoders) follows the default branches.
- "torchvision": the constructors of ResNet and VisionTransformer (torchvision 0.29.2).
- "torch": PyTorch's layer defaults, what `weightinit.torch` applies without a recipe.

A table is replayed over the model in the order the library runs it (children before their
parents, as transformers' `smart_apply` and torchvision's constructors do; a later write wins),
which gives each parameter the spec of the last init call that wrote it. A parameter that no
branch writes keeps what its layer's constructor gave it, PyTorch's layer default, so its spec
is None. A recipe meeting a model family it has no table for raises a ValueError naming it.
"""

import copy
import fnmatch
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

__all__ = ["RECIPES", "resolve"]

RECIPES = ("torch", "hf", "torchvision")

Spec = dict[str, Any]


class Context(NamedTuple):
    """What a write's spec is computed from: the family's settings (a transformers config, or
    what a torchvision model was built with) and the module holding the parameter."""

    config: Any
    module: nn.Module


SpecFn = Callable[[Context], "Spec | None"]


@dataclass(frozen=True)
class Each:
    """`path` below every module of `types` in the initializing module's subtree, itself
    included: a `for m in self.modules(): if isinstance(m, types)` loop."""

    types: Any
    path: str


@dataclass(frozen=True)
class Branch:
    """One `if isinstance(module, match)` branch of an init function: when it matches the module
    being initialized, it writes each (target, spec) of `writes`. match: classes, class names
    (looked up in the family's module, so that matching imports nothing), or a predicate. A
    target is a parameter path relative to the module ("c_proj.weight"; a glob in its last part
    matches local names) or an Each; a missing or None parameter is skipped, as the library's
    `if module.bias is not None` does. A spec function returning None writes nothing."""

    match: Any
    writes: tuple[tuple[Any, SpecFn], ...]


# A family's init code: a sequence of if/elif chains, each a tuple of Branches of which the first
# that matches writes (transformers' overrides call super()._init_weights first: its chain comes
# first).
Clauses = tuple[tuple[Branch, ...], ...]


@dataclass(frozen=True)
class Family:
    """A model family's init code: `clauses` run on every module of a root's subtree, with
    Context.config = settings(root)."""

    name: str
    clauses: Clauses
    settings: Callable[[nn.Module], Any]
    namespace: dict[str, Any]


# Spec builders, each the exact counterpart of a torch.nn.init call.
def _normal(std: float, mean: float = 0.0) -> Spec:
    return {"init": {"normal": {"mean": mean, "std": std}}}


def _trunc_normal(std: float, mean: float = 0.0, a: float = -2.0, b: float = 2.0) -> Spec:
    # torch.nn.init.trunc_normal_'s a and b are absolute bounds, as the service's are.
    return {"init": {"truncatedNormal": {"mean": mean, "std": std, "a": a, "b": b}}}


def _constant(value: float) -> Spec:
    if value == 0.0:
        return {"init": {"zeros": {}}}
    if value == 1.0:
        return {"init": {"ones": {}}}
    return {"init": {"constant": {"value": value}}}


def _fixed(spec: Spec) -> SpecFn:
    return lambda context: spec  # shared: spec_for() hands out copies


_ZEROS = _fixed(_constant(0.0))
_ONES = _fixed(_constant(1.0))
_XAVIER_UNIFORM = _fixed({"init": {"xavierUniform": {}}})
_XAVIER_NORMAL = _fixed({"init": {"xavierNormal": {}}})

# nn.MultiheadAttention._reset_parameters() (torch 2.x); out_proj.weight keeps its Linear
# default, and out_proj.bias exists exactly when in_proj_bias does.
_TORCH_MHA = Branch(
    nn.MultiheadAttention,
    (
        ("in_proj_weight", _XAVIER_UNIFORM),
        ("q_proj_weight", _XAVIER_UNIFORM),
        ("k_proj_weight", _XAVIER_UNIFORM),
        ("v_proj_weight", _XAVIER_UNIFORM),
        ("in_proj_bias", _ZEROS),
        ("out_proj.bias", _ZEROS),
        ("bias_k", _XAVIER_NORMAL),
        ("bias_v", _XAVIER_NORMAL),
    ),
)


# ---- transformers ------------------------------------------------------------------------


def _hf_std(config) -> float:
    """The std of PreTrainedModel._init_weights, read from the config as it reads it."""
    if hasattr(config, "initializer_range"):
        return config.initializer_range or 0.02
    if hasattr(config, "init_std"):
        return config.init_std
    if hasattr(config, "initializer_factor"):
        return config.initializer_factor
    return getattr(config.get_text_config(), "initializer_range", 0.02)


def _hf_norm(module: nn.Module) -> bool:
    # transformers matches its many LayerNorm / RMSNorm classes by name.
    name = type(module).__name__
    return (
        isinstance(module, (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        or "LayerNorm" in name
        or "RMSNorm" in name
    )


def _hf_normal(context: Context) -> Spec:
    return _normal(_hf_std(context.config))


# PreTrainedModel._init_weights. The padding_idx row an Embedding zeroes is not a TensorSpec:
# see docs/RECIPES.md.
_HF_DEFAULT = (
    Branch(
        (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d),
        (("weight", _hf_normal), ("bias", _ZEROS)),
    ),
    Branch(nn.LSTM, (("*weight*", _XAVIER_UNIFORM), ("*bias*", _ZEROS))),
    Branch(nn.Embedding, (("weight", _hf_normal),)),
    _TORCH_MHA,
    Branch(_hf_norm, (("weight", _ONES), ("bias", _ZEROS))),
)


def _t5_normal(scale: Callable[[Any], float]) -> SpecFn:
    """normal_(std=initializer_factor * scale(config)), as T5PreTrainedModel writes them."""
    return lambda context: _normal(context.config.initializer_factor * scale(context.config))


def _t5_untied_lm_head(context: Context) -> Spec | None:
    if context.config.tie_word_embeddings:
        return None
    return _normal(context.config.initializer_factor * 1.0)


_T5_ONE = _t5_normal(lambda config: 1.0)
_T5_D_MODEL = _t5_normal(lambda config: config.d_model**-0.5)
_T5_D_FF = _t5_normal(lambda config: config.d_ff**-0.5)

# Keyed by the class that defines the model's _init_weights.
_HF_FAMILIES: dict[str, tuple[str, Clauses]] = {
    "transformers.modeling_utils.PreTrainedModel": (
        "PreTrainedModel (the default _init_weights: Llama, Mistral, Qwen2, Qwen3, ...)",
        (_HF_DEFAULT,),
    ),
    "transformers.models.gpt2.modeling_gpt2.GPT2PreTrainedModel": (
        "GPT2PreTrainedModel",
        (
            _HF_DEFAULT,
            (
                Branch(
                    "Conv1D",
                    (
                        ("weight", lambda c: _normal(c.config.initializer_range)),
                        ("bias", _ZEROS),
                    ),
                ),
            ),
            # The residual projections, scaled by 1/sqrt(N) for N = 2 per block.
            (
                Branch(
                    ("GPT2Attention", "GPT2MLP"),
                    (
                        (
                            "c_proj.weight",
                            lambda c: _normal(
                                c.config.initializer_range / math.sqrt(2 * c.config.n_layer)
                            ),
                        ),
                    ),
                ),
            ),
        ),
    ),
    "transformers.models.bert.modeling_bert.BertPreTrainedModel": (
        "BertPreTrainedModel",
        (_HF_DEFAULT, (Branch("BertLMPredictionHead", (("bias", _ZEROS),)),)),
    ),
    "transformers.models.t5.modeling_t5.T5PreTrainedModel": (
        "T5PreTrainedModel",
        (
            _HF_DEFAULT,
            (
                Branch(
                    "T5LayerNorm",
                    (("weight", lambda c: _constant(c.config.initializer_factor * 1.0)),),
                ),
                Branch(
                    (
                        "T5Model",
                        "T5ForConditionalGeneration",
                        "T5EncoderModel",
                        "T5ForQuestionAnswering",
                    ),
                    (
                        ("shared.weight", _T5_ONE),
                        ("lm_head.weight", _t5_untied_lm_head),
                        ("qa_outputs.weight", _T5_D_MODEL),
                        ("qa_outputs.bias", _ZEROS),
                    ),
                ),
                Branch(
                    "T5ForTokenClassification",
                    (("classifier.weight", _T5_ONE), ("classifier.bias", _ZEROS)),
                ),
                Branch(
                    "T5ClassificationHead",
                    (
                        ("dense.weight", _T5_D_MODEL),
                        ("dense.bias", _ZEROS),
                        ("out_proj.weight", _T5_D_MODEL),
                        ("out_proj.bias", _ZEROS),
                    ),
                ),
                Branch(
                    "T5DenseActDense",
                    (
                        ("wi.weight", _T5_D_MODEL),
                        ("wi.bias", _ZEROS),
                        ("wo.weight", _T5_D_FF),
                        ("wo.bias", _ZEROS),
                    ),
                ),
                Branch(
                    "T5DenseGatedActDense",
                    (
                        ("wi_0.weight", _T5_D_MODEL),
                        ("wi_0.bias", _ZEROS),
                        ("wi_1.weight", _T5_D_MODEL),
                        ("wi_1.bias", _ZEROS),
                        ("wo.weight", _T5_D_FF),
                        ("wo.bias", _ZEROS),
                    ),
                ),
                Branch(
                    "T5Attention",
                    (
                        (
                            "q.weight",
                            _t5_normal(lambda config: (config.d_model * config.d_kv) ** -0.5),
                        ),
                        ("k.weight", _T5_D_MODEL),
                        ("v.weight", _T5_D_MODEL),
                        (
                            "o.weight",
                            _t5_normal(lambda config: (config.num_heads * config.d_kv) ** -0.5),
                        ),
                        ("relative_attention_bias.weight", _T5_D_MODEL),
                    ),
                ),
            ),
        ),
    ),
}

# The methods through which transformers runs _init_weights; a model overriding any of them
# initializes itself in a way no table here describes.
_HF_DRIVERS = ("_initialize_weights", "initialize_weights", "init_weights")


def _hf_scopes(model: nn.Module) -> Callable[[nn.Module], "tuple[Family, Any] | None"]:
    try:
        from transformers import PreTrainedModel
    except ImportError as error:
        raise ValueError("recipe: 'hf' needs the transformers package") from error

    families: dict[type, Family] = {}
    unknown = []
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, PreTrainedModel) or cls in families:
            continue
        owner = next(c for c in cls.__mro__ if "_init_weights" in vars(c))
        key = f"{owner.__module__}.{owner.__qualname__}"
        drivers = [d for d in _HF_DRIVERS if getattr(cls, d) is not getattr(PreTrainedModel, d)]
        if key not in _HF_FAMILIES or drivers:
            by = f"{owner.__qualname__}._init_weights" if not drivers else f"its own {drivers[0]}"
            model_type = getattr(module.config, "model_type", "?")
            unknown.append(f"{cls.__name__} (model_type {model_type!r}, initialized by {by})")
            continue
        name, clauses = _HF_FAMILIES[key]
        families[cls] = Family(name, clauses, _hf_config, vars(sys.modules[owner.__module__]))
    if unknown:
        known = "; ".join(name for name, _ in _HF_FAMILIES.values())
        raise ValueError(
            f"recipe: 'hf' has no recipe for {', '.join(unknown)}; it knows {known}. "
            "Initialize with rules, or recipe='torch'"
        )
    if not families:
        raise ValueError(
            f"recipe: 'hf' initializes transformers models (PreTrainedModel); "
            f"{type(model).__name__} contains none"
        )

    def scope(module):
        family = families.get(type(module))
        return None if family is None else (family, family.settings(module))

    return scope


def _hf_config(model):
    return model.config


# ---- torchvision -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResNetSettings:
    zero_init_residual: bool


def _resnet_settings(resnet: nn.Module) -> _ResNetSettings:
    """Whether `resnet` was built with zero_init_residual, which torchvision does not record:
    an explicit `resnet.zero_init_residual` attribute, else what its residual BNs hold."""
    explicit = getattr(resnet, "zero_init_residual", None)
    if explicit is not None:
        return _ResNetSettings(bool(explicit))
    from torchvision.models.resnet import BasicBlock, Bottleneck

    weights = [
        block.bn3.weight if isinstance(block, Bottleneck) else block.bn2.weight
        for block in resnet.modules()
        if isinstance(block, (BasicBlock, Bottleneck))
    ]
    weights = [w for w in weights if w is not None]
    if not weights:
        return _ResNetSettings(False)
    if all(not w.is_meta and bool((w == 0).all()) for w in weights):
        return _ResNetSettings(True)
    if all(not w.is_meta and bool((w == 1).all()) for w in weights):
        return _ResNetSettings(False)
    raise ValueError(
        "recipe: 'torchvision' cannot tell whether this ResNet was built with "
        "zero_init_residual: its residual batch-norm weights hold neither torchvision's 0 nor 1 "
        "(a meta, to_empty() or trained model); set model.zero_init_residual = True or False"
    )


def _kaiming_normal_fan_out_relu(context: Context) -> Spec:
    return {
        "init": {"kaimingNormal": {"mode": "FAN_MODE_FAN_OUT", "nonlinearity": "NONLINEARITY_RELU"}}
    }


def _zero_if_zero_init_residual(context: Context) -> Spec | None:
    return _constant(0.0) if context.config.zero_init_residual else None


def _vit_conv_proj(context: Context) -> Spec:
    conv = context.module
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return _trunc_normal(math.sqrt(1 / fan_in))


def _torchvision_families() -> dict[type, Family]:
    from torchvision.models import ResNet, VisionTransformer
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.vision_transformer import Encoder, MLPBlock

    norms = (nn.BatchNorm2d, nn.GroupNorm)
    resnet = (
        (
            Branch(
                ResNet,
                (
                    (Each(nn.Conv2d, "weight"), _kaiming_normal_fan_out_relu),
                    (Each(norms, "weight"), _ONES),
                    (Each(norms, "bias"), _ZEROS),
                ),
            ),
        ),
        (
            Branch(
                ResNet,
                (
                    (Each(Bottleneck, "bn3.weight"), _zero_if_zero_init_residual),
                    (Each(BasicBlock, "bn2.weight"), _zero_if_zero_init_residual),
                ),
            ),
        ),
    )
    vit = (
        (
            _TORCH_MHA,
            Branch(
                MLPBlock,
                (
                    (Each(nn.Linear, "weight"), _XAVIER_UNIFORM),
                    (Each(nn.Linear, "bias"), _fixed(_normal(1e-6))),
                ),
            ),
            Branch(Encoder, (("pos_embedding", _fixed(_normal(0.02))),)),
            Branch(
                VisionTransformer,
                (
                    ("class_token", _ZEROS),
                    # conv_proj is a Conv2d, or a conv stem ending in conv_last.
                    ("conv_proj.weight", _vit_conv_proj),
                    ("conv_proj.bias", _ZEROS),
                    (
                        "conv_proj.conv_last.weight",
                        lambda c: _normal(math.sqrt(2.0 / c.module.out_channels)),
                    ),
                    ("conv_proj.conv_last.bias", _ZEROS),
                    (
                        "heads.pre_logits.weight",
                        lambda c: _trunc_normal(math.sqrt(1 / c.module.in_features)),
                    ),
                    ("heads.pre_logits.bias", _ZEROS),
                    ("heads.head.weight", _ZEROS),
                    ("heads.head.bias", _ZEROS),
                ),
            ),
        ),
    )
    return {
        ResNet: Family("ResNet", resnet, _resnet_settings, {}),
        VisionTransformer: Family("VisionTransformer", vit, lambda root: None, {}),
    }


def _torchvision_scopes(model: nn.Module) -> Callable[[nn.Module], "tuple[Family, Any] | None"]:
    try:
        import torchvision.models
    except ImportError as error:
        raise ValueError("recipe: 'torchvision' needs the torchvision package") from error

    families = _torchvision_families()
    architectures = {
        cls
        for cls in vars(torchvision.models).values()
        if isinstance(cls, type) and issubclass(cls, nn.Module)
    }
    roots, unknown = {}, []
    for module in model.modules():
        family = next((f for cls, f in families.items() if isinstance(module, cls)), None)
        if family is not None:
            roots[id(module)] = (family, family.settings(module))
        elif type(module) in architectures:
            unknown.append(type(module).__name__)
    if unknown:
        raise ValueError(
            f"recipe: 'torchvision' has no recipe for {', '.join(sorted(set(unknown)))}; it knows "
            "ResNet (resnet*, resnext*, wide_resnet*) and VisionTransformer (vit_*)"
        )
    if not roots:
        raise ValueError(
            "recipe: 'torchvision' initializes torchvision's ResNet and VisionTransformer; "
            f"{type(model).__name__} contains neither"
        )
    return lambda module: roots.get(id(module))


# ---- the engine --------------------------------------------------------------------------


def _matcher(match, namespace) -> Callable[[nn.Module], bool]:
    if callable(match) and not isinstance(match, type):
        return match
    classes = []
    for item in match if isinstance(match, tuple) else (match,):
        if isinstance(item, str):
            if item not in namespace:
                raise ValueError(
                    f"recipe: {item} is not in this transformers version (the recipe was "
                    "written for transformers 5.24)"
                )
            item = namespace[item]
        classes.append(item)
    classes = tuple(classes)
    return lambda module: isinstance(module, classes)


def _targets(module: nn.Module, target) -> list[tuple[nn.Module, str]]:
    """The (holder, local name) of every parameter `target` designates below `module`."""
    if isinstance(target, Each):
        return [
            found
            for sub in module.modules()
            if isinstance(sub, target.types)
            for found in _targets(sub, target.path)
        ]
    prefix, _, local = target.rpartition(".")
    try:
        holder = module.get_submodule(prefix)
    except AttributeError:
        return []
    return [
        (holder, name)
        for name, param in holder._parameters.items()
        if param is not None and fnmatch.fnmatchcase(name, local)
    ]


def _replay(model: nn.Module, scope_of) -> dict[tuple[int, str], Spec]:
    """Runs the families' tables over `model`, children before parents, each module once; returns
    the last spec written to each (id(holder), local name)."""
    written: dict[tuple[int, str], Spec] = {}
    seen: set[int] = set()
    bound: dict[tuple[str, int], Callable[[nn.Module], bool]] = {}

    def visit(module, scope):
        seen.add(id(module))
        scope = scope_of(module) or scope
        for child in module.children():
            if id(child) not in seen:
                visit(child, scope)
        if scope is None:
            return
        family, config = scope
        for clause in family.clauses:
            for branch in clause:
                key = (family.name, id(branch))
                if key not in bound:
                    bound[key] = _matcher(branch.match, family.namespace)
                if not bound[key](module):
                    continue
                for target, spec_fn in branch.writes:
                    for holder, local in _targets(module, target):
                        spec = spec_fn(Context(config, holder))
                        if spec is not None:
                            written[(id(holder), local)] = spec
                break

    visit(model, None)
    return written


def resolve(recipe: str, model: nn.Module) -> Callable[[nn.Module, str, str], "Spec | None"]:
    """Returns spec_for(owner, local, name) for the parameters of `model` under `recipe`.

    recipe: "torch" (PyTorch's layer defaults), "hf" (transformers' _init_weights) or
        "torchvision" (the ResNet and VisionTransformer constructors).
    spec_for(owner, local, name): owner is the module holding the parameter, local its name
        there ("weight"), name its qualified name. Returns the TensorSpec fields of the
        parameter in proto3 JSON form (`{"init": {"normal": {"std": 0.02}}}`), or None when the
        recipe leaves it to its layer's PyTorch default.

    Raises ValueError naming `recipe` for an unknown recipe, or for a model, or a model family
    inside it, that the recipe has no table for. Modules outside every family the recipe knows
    (a custom head around a transformers backbone, say) keep their PyTorch defaults.
    """
    if recipe == "torch":
        return lambda owner, local, name: None
    if recipe == "hf":
        scope_of = _hf_scopes(model)
    elif recipe == "torchvision":
        scope_of = _torchvision_scopes(model)
    else:
        raise ValueError(f"recipe: must be one of {', '.join(map(repr, RECIPES))}, got {recipe!r}")
    written = _replay(model, scope_of)
    modules = {id(module): module for module in model.modules()}  # keeps the ids meaningful

    def spec_for(owner: nn.Module, local: str, name: str) -> Spec | None:
        spec = written.get((id(owner), local)) if modules.get(id(owner)) is owner else None
        return copy.deepcopy(spec)

    return spec_for
