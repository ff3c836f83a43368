"""PyTorch's own default init for every torch.nn layer that owns parameters, served: each
parameter is compared with what torch itself draws for the same layer (same distribution)."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import weightinit
import weightinit.torch as wt

SEED = 4242
TIMEOUT = 60
QUANTILES = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)

LAYERS = {
    "Linear": lambda: nn.Linear(96, 128),
    "Conv2d": lambda: nn.Conv2d(16, 32, 3),
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(16, 24, 3, groups=2),
    "Bilinear": lambda: nn.Bilinear(20, 30, 40),
    "MultiheadAttention": lambda: nn.MultiheadAttention(128, 4, add_bias_kv=True),
    "MultiheadAttention kdim vdim": lambda: nn.MultiheadAttention(64, 4, kdim=32, vdim=48),
    "RNN": lambda: nn.RNN(32, 64, num_layers=2, bidirectional=True),
    "LSTM proj": lambda: nn.LSTM(32, 64, proj_size=16),
    "GRU": lambda: nn.GRU(32, 96),
    "RNNCell": lambda: nn.RNNCell(32, 64),
    "LSTMCell": lambda: nn.LSTMCell(32, 64),
    "GRUCell": lambda: nn.GRUCell(32, 64),
    "PReLU": lambda: nn.PReLU(8, init=0.1),
    "Embedding padding_idx": lambda: nn.Embedding(300, 64, padding_idx=3),
    "EmbeddingBag padding_idx": lambda: nn.EmbeddingBag(300, 64, padding_idx=0),
    "TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(64, 4, 128),
    "TransformerDecoderLayer": lambda: nn.TransformerDecoderLayer(64, 4, 128),
    "Transformer": lambda: nn.Transformer(64, 4, 1, 1, 128, batch_first=True),
    "norms": lambda: nn.ModuleList(
        [
            nn.LayerNorm(8),
            nn.GroupNorm(2, 8),
            nn.RMSNorm(8),
            nn.BatchNorm1d(8),
            nn.InstanceNorm1d(8, affine=True),
        ]
    ),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_served_values_follow_the_distribution_torch_draws(layer, target):
    torch.manual_seed(0)
    drawn = LAYERS[layer]()
    served = LAYERS[layer]()
    wt.init_module(served, SEED, target, timeout=TIMEOUT)
    constant = layer in ("PReLU", "norms")  # nothing drawn: written, not served
    assert bool(wt.build_request(served, SEED)["tensors"]) != constant, layer
    for (name, mine), theirs in zip(served.named_parameters(), drawn.parameters()):
        mine, theirs = mine.detach().double().flatten(), theirs.detach().double().flatten()
        if torch.all(theirs == theirs[0]):
            assert torch.equal(mine, theirs), f"{name}: torch sets every value to {theirs[0]}"
            continue
        assert not torch.equal(mine, theirs), f"{name} kept torch's values"
        # Tolerances of a few standard errors of the two estimates (n values each); the
        # quantiles, a stricter test of the distribution's shape, on large tensors only.
        n, spread = mine.numel(), theirs.std()
        assert abs(mine.std() / spread - 1) < 0.03 + 4 / n**0.5, name
        assert abs(mine.mean() - theirs.mean()) < 4 * (2 / n) ** 0.5 * spread, name
        if n >= 4096:
            gaps = torch.quantile(mine, QUANTILES) - torch.quantile(theirs, QUANTILES)
            assert gaps.abs().max() < 0.1 * spread, (name, gaps / spread)
            assert mine.abs().max() <= 1.1 * theirs.abs().max(), name


@pytest.mark.parametrize("factory", [nn.Embedding, nn.EmbeddingBag])
def test_padding_rows_are_zero_and_the_rest_is_the_servers(factory, target):
    layer = factory(20, 8, padding_idx=4)
    wt.init_module(layer, SEED, target, timeout=TIMEOUT)
    request = wt.build_request(layer, SEED)
    served = torch.from_numpy(weightinit.fetch(request, target)["weight"])
    assert torch.equal(layer.weight[4], torch.zeros(8))
    rows = [r for r in range(20) if r != 4]
    assert torch.equal(layer.weight.detach()[rows], served[rows])
    assert served[4].abs().sum() > 0  # the server's own values there are not zero


def test_sharded_padding_row_is_zero_in_the_shard_that_holds_it(target):
    layer = nn.Embedding(10, 4, padding_idx=7)
    shards = [wt.init_module(layer, SEED, target, rank=r, world_size=3) for r in range(3)]
    joined = torch.cat([shard["weight"] for shard in shards])
    assert torch.equal(joined[7], torch.zeros(4)) and joined[6].abs().sum() > 0


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.ones(4, 4))
        self.offset = nn.Parameter(torch.zeros(4))


def test_the_error_for_unwritten_parameters_names_each_and_suggests_rules():
    model = nn.Sequential(Scaled(), Scaled())
    with pytest.raises(ValueError) as raised:
        wt.build_request(model, SEED)
    message = str(raised.value)
    for name in ("0.gate", "0.offset", "1.gate", "1.offset"):
        assert f"\n  {name}: no init code writes it" in message
    assert "proj" not in message
    assert "('0.gate', {\"xavierUniform\": {}}), ('0.offset', {\"zeros\": {}})" in message
    # Rules in the form suggested work.
    rules = [("*.gate", {"xavierUniform": {}}), ("*.offset", {"zeros": {}})]
    assert len(wt.build_request(model, SEED, rules)["tensors"]) == 8
