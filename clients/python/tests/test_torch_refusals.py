"""What weightinit.torch refuses, before anything is written: each message names the parameter,
the operation and what would replace it; the model keeps every value it had."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import weightinit.torch as wt

SEED = 5


class Init(nn.Module):
    """A Linear and a LayerNorm whose init is the function given."""

    def __init__(self, init):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self._init = init

    def init_weights(self):
        nn.init.zeros_(self.proj.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        self._init(self)


def _refused(init, *patterns, rules=None):
    """Runs init_module on a model whose init_weights() calls `init`; returns the message,
    after checking that every parameter kept its value."""
    model = Init(init)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError) as raised:
        wt.init_module(model, SEED, "local", rules=rules)
    message = str(raised.value)
    for pattern in patterns:
        assert pattern in message, message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} was written"
    return message


def test_a_draw_into_a_temporary_copied_in_later():
    def init(m):
        scaled = torch.empty(6, 4)
        nn.init.normal_(scaled, std=0.02)
        m.proj.weight.data.copy_(scaled * 2)

    _refused(
        init,
        "proj.weight: copy_ copies in values drawn by torch.nn.init.normal_(mean=0.0, std=0.02)",
        "rules=[('proj.weight', {\"xavierUniform\": {}})]",
    )


def test_a_draw_into_a_slice_of_a_parameter():
    def init(m):
        nn.init.normal_(m.proj.weight[:3], std=0.02)
        nn.init.zeros_(m.proj.weight[3:])

    _refused(init, "proj.weight: torch.nn.init.normal_(mean=0.0, std=0.02) draws into a part of it")


def test_torch_randn_assigned_to_a_parameter():
    def init(m):
        m.proj.weight.data = torch.randn(6, 4) * 0.1

    _refused(init, "proj.weight: data.__set__ copies in values drawn by torch.randn")


def test_bernoulli_has_no_served_counterpart():
    def init(m):
        m.proj.weight.data.bernoulli_(0.5)

    _refused(
        init, "proj.weight: bernoulli_ is not exact across devices or has no served equivalent"
    )


def test_erfinv_after_a_draw_is_not_exact_across_devices():
    def init(m):
        m.proj.weight.data.uniform_(-0.9, 0.9)
        m.proj.weight.data.erfinv_()

    _refused(init, "proj.weight: erfinv_ is not exact across devices")


def test_a_parameter_no_init_code_writes_is_named():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.gate = nn.Parameter(torch.empty(2))

    with pytest.raises(ValueError, match=r"gate: no init code writes it") as raised:
        wt.init_module(Scaled(), SEED, "local")
    assert "rules=[('gate', {\"zeros\": {}})]" in str(raised.value)


def test_reading_a_parameter_during_init_is_refused():
    def init(m):
        nn.init.normal_(m.proj.weight)
        m.proj.weight.data.div_(m.proj.weight.data.norm())

    _refused(init, "proj.weight: the init code reads its values")


def test_a_rule_replaces_what_would_be_refused():
    def init(m):
        m.proj.weight.data.bernoulli_(0.5)

    model = Init(init)
    wt.init_module(model, SEED, "local", rules=[("proj.weight", {"normal": {"std": 0.5}})])
    assert model.proj.weight.std() > 0.1


def test_exact_steps_after_a_draw_are_replayed():
    def init(m):
        nn.init.normal_(m.proj.weight)
        m.proj.weight.data.mul_(0.5)

    scaled = Init(init)
    wt.init_module(scaled, SEED, "local")
    plain = Init(lambda m: nn.init.normal_(m.proj.weight))
    wt.init_module(plain, SEED, "local")
    assert torch.equal(scaled.proj.weight, plain.proj.weight * 0.5)


def test_server_refusals_name_the_parameter_not_the_request_index(target):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    rule = ("1.weight", {"kaimingUniform": {"mode": "FAN_MODE_FAN_AVG"}})
    with pytest.raises(ValueError) as raised:
        wt.init_module(model, SEED, target, rules=[rule])
    message = str(raised.value)
    assert message.startswith("1.weight.init"), message
    assert "tensors[" not in message


@pytest.mark.parametrize(
    "seed", [np.uint64(SEED), np.int32(SEED), torch.tensor(SEED), torch.tensor(SEED).int()]
)
def test_numpy_and_torch_integer_seeds(seed):
    assert wt.build_request(nn.Linear(2, 2), seed)["seed"] == SEED


@pytest.mark.parametrize("seed", [np.float64(5.0), torch.tensor(5.0), -1, True])
def test_non_integer_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="seed: must be in 0..2\\*\\*64-1"):
        wt.build_request(nn.Linear(2, 2), seed)
