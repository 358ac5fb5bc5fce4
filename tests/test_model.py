"""The MLP and make_norm (bnexp/nn/model.py)."""

import pytest
import torch
from torch import nn

from bnexp import layers
from bnexp.config import NormConfig
from bnexp.nn.compiled import CompiledBatchNorm1d
from bnexp.nn.model import MLP, init_weights, make_norm


def build(norm, seed=0, widths=(8, 6)):
    model = MLP(list(widths), "sigmoid", norm)
    init_weights(model, 0.1, torch.Generator().manual_seed(seed))
    return model


def test_make_norm_picks_each_variant():
    """none -> Identity, custom -> ours (compiled with compile=True), native -> torch's, the other
    normalizations -> ours, with the run's settings from a NormConfig; else refused."""
    assert isinstance(make_norm("none", 4), nn.Identity)
    assert type(make_norm("custom", 4)) is layers.BatchNorm1d
    assert type(make_norm("native", 4)) is nn.BatchNorm1d
    compiled_norm = make_norm("custom", 4, compile=True)  # norm.compile=true
    assert type(compiled_norm) is CompiledBatchNorm1d and isinstance(compiled_norm, layers.BatchNorm1d)
    assert compiled_norm.state_dict().keys() == make_norm("native", 4).state_dict().keys()
    assert type(make_norm("layer", 4)) is layers.LayerNorm
    group = make_norm(NormConfig(name="group", groups=2), 4)
    assert type(group) is layers.GroupNorm and group.num_groups == 2
    renorm = make_norm(NormConfig(name="batch_renorm", r_max=2.0, d_max=1.0, hold_steps=3, warmup_steps=7), 4)
    assert type(renorm) is layers.BatchRenorm1d and (renorm.r_max, renorm.d_max, renorm.hold_steps,
                                                    renorm.warmup_steps) == (2.0, 1.0, 3, 7)
    with pytest.raises(ValueError, match="norm='weight' is not known"):
        make_norm("weight", 4)


@pytest.mark.parametrize("norm,has_bias", [("none", True), ("custom", False), ("native", False)])
def test_linear_bias_is_dropped_before_a_norm(norm, has_bias):
    """Ioffe & Szegedy: with BN the Linear's bias is redundant (beta replaces it)."""
    model = build(norm)
    assert all((layer.linear.bias is not None) == has_bias for layer in model.hidden)
    assert model.head.bias is not None


def test_custom_and_native_start_identical_and_share_state_dict_keys():
    """Same seed -> same weights for every variant; custom and native state_dicts interchange."""
    custom, native, plain = build("custom"), build("native"), build("none")
    for a, b, c in zip(custom.hidden, native.hidden, plain.hidden):
        assert torch.equal(a.linear.weight, b.linear.weight)
        assert torch.equal(a.linear.weight, c.linear.weight)
    assert custom.state_dict().keys() == native.state_dict().keys()
    native.load_state_dict(custom.state_dict(), strict=True)


def test_init_is_gaussian_with_the_given_std():
    """Weights ~ N(0, init_std), biases zero."""
    model = MLP([400], "sigmoid", "none", in_features=500)
    init_weights(model, 0.05, torch.Generator().manual_seed(0))
    w = model.hidden[0].linear.weight
    assert abs(w.std().item() - 0.05) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(model.hidden[0].linear.bias) == 0


def test_preactivations_feed_the_nonlinearity():
    """preactivations() are what each activation receives; the forward pass agrees with them."""
    model = build("custom").eval()
    x = torch.randn(5, 784)
    zs = model.preactivations(x)
    assert [z.shape for z in zs] == [(5, 8), (5, 6)]
    torch.testing.assert_close(model.head(torch.sigmoid(zs[-1])), model(x))
    assert list(model.norm_layers()) == ["layer1", "layer2"]
    assert build("none").norm_layers() == {}
