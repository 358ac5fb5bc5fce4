"""bnexp/nn's layer_norm and group_norm against torch's layer and group norm, and batch_renorm
against batch norm and the paper's equations; assert_close with its default tolerances throughout."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from bnexp import layers
from bnexp.layers import BatchNorm1d
from bnexp.nn import batch_renorm as batch_renorm_module, group_norm as group_norm_module
from bnexp.nn import layer_norm as layer_norm_module, norm_common
from bnexp.nn.batch_renorm import BatchRenorm1d, batch_renorm, renorm_limits
from bnexp.nn.group_norm import GroupNorm, group_norm
from bnexp.nn.layer_norm import LayerNorm, layer_norm
from bnexp.nn.norm_autograd import autograd_forward

NORM_MODULES = [layer_norm_module, group_norm_module, batch_renorm_module, norm_common]

DTYPES = [torch.float32, torch.float64]
AFFINE = [dict(), dict(bias=False), dict(affine=False)]  # weight and bias; weight only; neither


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(shape, g, dtype=torch.float32, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=dtype) * scale + shift


def randomize(module, g):
    """Random weight and bias (where the module has them), so that they matter in the comparison."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(p.shape, g, p.dtype, scale=0.5, shift=1.0))
    return module


def output_and_grads(fn, x, params, upstream):
    """fn(x) and the gradients of (fn(x) * upstream).sum() for x and each of params."""
    x = x.detach().requires_grad_()
    out = fn(x)
    return out, torch.autograd.grad(out, [x, *params], upstream)


def assert_same(ours, theirs):
    """Same output and same gradients, pairwise."""
    (out_a, grads_a), (out_b, grads_b) = ours, theirs
    assert_close(out_a, out_b)
    for got, want in zip(grads_a, grads_b, strict=True):
        assert_close(got, want)


def raised(fn):
    """(exception type, message) of what fn() raises, None if it returns."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return None


# ----------------------------------------------------------------------------- layer norm

LN_CASES = [((60, 100), 100), ((8, 3, 5), (5,)), ((8, 3, 5), (3, 5)), ((2, 4, 6, 7), (6, 7)),
            ((2, 4, 6, 7), [4, 6, 7]), ((5,), 5), ((1, 7), 7)]


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("options", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, normalized_shape", LN_CASES)
def test_layer_norm_module_matches_torch(shape, normalized_shape, dtype, options, eps):
    """LayerNorm and nn.LayerNorm: output and the gradients of input, weight and bias."""
    affine = dict(elementwise_affine=options.get("affine", True), bias=options.get("bias", True))
    theirs = torch.nn.LayerNorm(normalized_shape, eps=eps, dtype=dtype, **affine)
    ours = LayerNorm(normalized_shape, eps=eps, dtype=dtype, **affine)
    g = gen(1)
    ours.load_state_dict(randomize(theirs, g).state_dict(), strict=True)
    x, upstream = randn(shape, g, dtype, scale=50.0, shift=10.0), randn(shape, g, dtype)
    assert_same(output_and_grads(ours, x, list(ours.parameters()), upstream),
                output_and_grads(theirs, x, list(theirs.parameters()), upstream))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_functional_matches_torch(dtype):
    """layer_norm and F.layer_norm with a tuple, a list and a torch.Size, with and without weight and bias."""
    g = gen(2)
    x, upstream = randn((6, 4, 5), g, dtype, 3.0, 1.0), randn((6, 4, 5), g, dtype)
    w, b = randn((4, 5), g, dtype).requires_grad_(), randn((4, 5), g, dtype).requires_grad_()
    for shape in [(4, 5), [4, 5], torch.Size([4, 5])]:
        for params in [(w, b), (w, None), (None, b), (None, None)]:
            wanted = [p for p in params if p is not None]
            assert_same(output_and_grads(lambda t: layer_norm(t, shape, *params, eps=1e-3), x, wanted, upstream),
                        output_and_grads(lambda t: F.layer_norm(t, shape, *params, eps=1e-3), x, wanted, upstream))


def test_layer_norm_strided_input_and_expanded_gradient():
    """A transposed input and .sum()'s expanded upstream gradient (stride 0) agree with torch."""
    g = gen(3)
    x = randn((9, 12), g, scale=5.0).t()  # (12, 9), not contiguous
    assert not x.is_contiguous()
    grads = []
    for fn in (layer_norm, F.layer_norm):
        xg = x.detach().requires_grad_()
        out = fn(xg, (9,))
        grads.append((out, torch.autograd.grad((out * torch.arange(9.0)).sum(), xg)[0]))
    assert_close(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1])


def test_layer_norm_module_interface_matches_torch():
    """normalized_shape as a tuple, parameter shapes and names, state_dict keys, repr, reset_parameters."""
    for args in [(7,), ((3, 4),), ([3, 4], 1e-3, False), (torch.Size([2, 3]),), (5, 1e-5, True, False)]:
        ours, theirs = LayerNorm(*args), torch.nn.LayerNorm(*args)
        assert ours.normalized_shape == theirs.normalized_shape and type(ours.normalized_shape) is tuple
        assert repr(ours) == repr(theirs) and ours.extra_repr() == theirs.extra_repr()
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert [(n, p.shape) for n, p in ours.named_parameters()] == \
            [(n, p.shape) for n, p in theirs.named_parameters()]
        assert (ours.weight is None, ours.bias is None) == (theirs.weight is None, theirs.bias is None)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    ours = randomize(LayerNorm((3, 4), dtype=torch.float64), gen())
    ours.reset_parameters()
    assert_close(ours.weight, torch.ones(3, 4, dtype=torch.float64))
    assert_close(ours.bias, torch.zeros(3, 4, dtype=torch.float64))


LN_ERRORS = [  # (input shape, normalized_shape, weight shape, bias shape)
    ((3, 4), (5,), None, None), ((2, 3, 4), (2, 4), None, None), ((4,), (3, 4), None, None), ((4,), (), None, None),
    ((3, 4), (4,), (5,), None), ((3, 4), (4,), None, (5,)), ((3, 4), (4,), (1, 4), None), ((3, 4), (5,), (4,), None),
    ((3, 4), (), (5,), None), ((), (1,), None, None), ((3, 4), (-1,), None, None), ((3, 4), 4, None, None),
    ((3, 4), 4.0, None, None), ((3, 4), None, None, None), ((3, 4), "4", None, None), ((3, 4), (4.0,), None, None),
    ((3, 4), (4, 4.0), None, None), ((3, 4), (True,), None, None),
]


@pytest.mark.parametrize("shape, normalized_shape, weight, bias", LN_ERRORS)
def test_layer_norm_errors_match_torch(shape, normalized_shape, weight, bias):
    """layer_norm raises what F.layer_norm raises: the same exception type and message."""
    args = (torch.randn(shape), normalized_shape, None if weight is None else torch.ones(weight),
            None if bias is None else torch.ones(bias))
    expected = raised(lambda: F.layer_norm(*args))
    assert expected is not None
    assert raised(lambda: layer_norm(*args)) == expected


@pytest.mark.parametrize("args, shape", [((5,), (3, 4)), (((3, 4),), (3, 5)), ((4,), ()), ((4.0,), None),
                                         ((-1,), None), (((3, -1),), None)])
def test_layer_norm_module_errors_match_torch(args, shape):
    """LayerNorm raises what nn.LayerNorm raises, at construction or in forward."""
    def run(cls):
        return lambda: cls(*args)(torch.randn(shape))
    expected = raised(run(torch.nn.LayerNorm))
    assert expected is not None
    assert raised(run(LayerNorm)) == expected


def test_layer_norm_accepts_what_torch_accepts_as_sizes():
    """numpy ints and 0-dim integer tensors in normalized_shape, and inputs with no rows or no values."""
    x = torch.randn(3, 4)
    for shape in [(np.int64(4),), (torch.tensor(4),)]:
        assert_close(layer_norm(x, shape), F.layer_norm(x, shape))
    for x, shape in [(torch.randn(0, 4), (4,)), (torch.randn(3, 0), (0,))]:
        assert layer_norm(x, shape).shape == F.layer_norm(x, shape).shape == x.shape


# ----------------------------------------------------------------------------- group norm

GN_CASES = [((60, 100), 4), ((60, 100), 1), ((60, 100), 20), ((8, 6, 5), 3), ((8, 6, 5), 6), ((8, 6, 5), 1),
            ((2, 4, 6, 7), 2), ((3, 6, 2, 2, 3), 3), ((1, 6, 4), 2)]


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("options", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_groups", GN_CASES)
def test_group_norm_module_matches_torch(shape, num_groups, dtype, options, eps):
    """GroupNorm and nn.GroupNorm: output and the gradients of input, weight and bias."""
    theirs = torch.nn.GroupNorm(num_groups, shape[1], eps=eps, dtype=dtype, **options)
    ours = GroupNorm(num_groups, shape[1], eps=eps, dtype=dtype, **options)
    g = gen(4)
    ours.load_state_dict(randomize(theirs, g).state_dict(), strict=True)
    x, upstream = randn(shape, g, dtype, scale=50.0, shift=10.0), randn(shape, g, dtype)
    assert_same(output_and_grads(ours, x, list(ours.parameters()), upstream),
                output_and_grads(theirs, x, list(theirs.parameters()), upstream))


@pytest.mark.parametrize("num_groups", [50, 100])
def test_group_norm_tiny_groups_match_torch_in_float64(num_groups):
    """Groups of 2 and 1 values: output and gradients in float64 (in float32, torch's own kernel
    drifts ~1e-4 from the float64 result there, past the default tolerance, so the grid leaves them out)."""
    g = gen(14)
    x, upstream = randn((60, 100), g, torch.float64, 50.0, 10.0), randn((60, 100), g, torch.float64)
    w, b = randn(100, g, torch.float64).requires_grad_(), randn(100, g, torch.float64).requires_grad_()
    assert_same(output_and_grads(lambda t: group_norm(t, num_groups, w, b), x, [w, b], upstream),
                output_and_grads(lambda t: F.group_norm(t, num_groups, w, b), x, [w, b], upstream))


def test_group_norm_single_value_groups_are_exact_in_float32():
    """One value per group: x - mean is exactly 0, so y is exactly the bias and dx exactly 0 (torch's is ~1e-3 off)."""
    g = gen(15)
    x = randn((60, 100), g, scale=50.0, shift=10.0).requires_grad_()
    b = randn(100, g)
    y = group_norm(x, 100, torch.ones(100), b)
    assert torch.equal(y, b.expand(60, 100))
    assert torch.equal(torch.autograd.grad(y, x, randn((60, 100), g))[0], torch.zeros(60, 100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_functional_matches_torch(dtype):
    """group_norm and F.group_norm, with and without weight and bias, and on a strided input."""
    g = gen(5)
    x, upstream = randn((5, 6, 7), g, dtype, 3.0, 1.0), randn((5, 6, 7), g, dtype)
    w, b = randn(6, g, dtype).requires_grad_(), randn(6, g, dtype).requires_grad_()
    for params in [(w, b), (w, None), (None, b), (None, None)]:
        wanted = [p for p in params if p is not None]
        assert_same(output_and_grads(lambda t: group_norm(t, 3, *params, eps=1e-3), x, wanted, upstream),
                    output_and_grads(lambda t: F.group_norm(t, 3, *params, eps=1e-3), x, wanted, upstream))
    strided = randn((7, 6, 5), g, dtype).transpose(0, 2)  # (5, 6, 7), not contiguous
    assert not strided.is_contiguous()
    assert_same(output_and_grads(lambda t: group_norm(t, 2, w, b), strided, [w, b], upstream),
                output_and_grads(lambda t: F.group_norm(t, 2, w, b), strided, [w, b], upstream))


def test_group_norm_module_interface_matches_torch():
    """Parameter names and shapes, state_dict keys, repr, reset_parameters."""
    for args, kwargs in [((2, 4), {}), ((3, 6, 1e-3, False), {}), ((1, 5), dict(bias=False))]:
        ours, theirs = GroupNorm(*args, **kwargs), torch.nn.GroupNorm(*args, **kwargs)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert [(n, p.shape) for n, p in ours.named_parameters()] == \
            [(n, p.shape) for n, p in theirs.named_parameters()]
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    ours = randomize(GroupNorm(2, 4), gen())
    ours.reset_parameters()
    assert_close(ours.weight, torch.ones(4))
    assert_close(ours.bias, torch.zeros(4))


GN_ERRORS = [  # (input shape, num_groups, weight shape, bias shape)
    ((2, 4, 3), 3, None, None), ((4,), 2, None, None), ((2, 4), 0, None, None), ((2, 4), -2, None, None),
    ((1, 4), 4, None, None), ((1, 4, 1), 4, None, None), ((1, 3), 4, None, None), ((2, 4, 3), 3, (5,), None),
    ((2, 4, 3), 2, (1, 4), None), ((2, 4, 3), 2, (3,), (3,)), ((2, 4, 3), 2, None, (3,)), ((2, 4, 0), 2, None, None),
    ((0, 4, 0), 2, None, None), ((2, 0, 3), 2, None, None), ((2, 0, 3), -2, None, None), ((2, 4, 3), 2.0, None, None),
    ((2, 4, 3), True, None, None), ((2, 4, 3, 0), 2, None, None), ((0, 4, 3), 3, None, None), ((0, 0), 1, None, None),
]


@pytest.mark.parametrize("shape, num_groups, weight, bias", GN_ERRORS)
def test_group_norm_errors_match_torch(shape, num_groups, weight, bias):
    """group_norm raises what F.group_norm raises: the same exception type and message."""
    args = (torch.randn(shape), num_groups, None if weight is None else torch.ones(weight),
            None if bias is None else torch.ones(bias))
    expected = raised(lambda: F.group_norm(*args))
    assert expected is not None
    assert raised(lambda: group_norm(*args)) == expected


@pytest.mark.parametrize("args, shape", [((3, 4), None), ((0, 4), None), ((2, 4), (2, 6)), ((2, 4), (4,)),
                                         ((2, 2), (1, 2, 1))])
def test_group_norm_module_errors_match_torch(args, shape):
    """GroupNorm raises what nn.GroupNorm raises: channels not divisible by groups (ValueError), and in forward."""
    def run(cls):
        return lambda: cls(*args)(torch.randn(shape))
    expected = raised(run(torch.nn.GroupNorm))
    assert expected is not None
    assert raised(run(GroupNorm)) == expected


def test_group_norm_accepts_what_torch_accepts():
    """num_groups as a numpy int or a 0-dim tensor, and an empty batch."""
    x = torch.randn(2, 4, 3)
    for groups in (np.int64(2), torch.tensor(2)):
        assert_close(group_norm(x, groups), F.group_norm(x, groups))
    assert group_norm(torch.randn(0, 4), 2).shape == F.group_norm(torch.randn(0, 4), 2).shape == (0, 4)


# ----------------------------------------------------------------------------- both: gradients


GRADCHECK_CASES = {  # name: (input shape, parameter shape, function)
    "layer_norm (N, D)": ((5, 6), (6,), lambda x, w, b: layer_norm(x, (6,), w, b, 1e-3)),
    "layer_norm (N, C, D1, D2)": ((2, 2, 3, 4), (3, 4), lambda x, w, b: layer_norm(x, (3, 4), w, b, 1e-3)),
    "group_norm (N, C)": ((5, 6), (6,), lambda x, w, b: group_norm(x, 3, w, b, 1e-3)),
    "group_norm (N, C, L)": ((3, 4, 3), (4,), lambda x, w, b: group_norm(x, 2, w, b, 1e-3)),
    "group_norm (N, C, H, W)": ((2, 4, 2, 3), (4,), lambda x, w, b: group_norm(x, 1, w, b, 1e-3)),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_first_derivatives_pass_gradcheck(name):
    """The analytic backward against finite differences (float64): input, weight and bias."""
    shape, param_shape, fn = GRADCHECK_CASES[name]
    g = gen(6)
    args = [randn(s, g, torch.float64).requires_grad_() for s in (shape, param_shape, param_shape)]
    assert torch.autograd.gradcheck(fn, args)


def test_second_derivatives_raise_rather_than_mislead():
    """Differentiating a gradient raises the once_differentiable error for all three layers."""
    layers_and_inputs = [(LayerNorm(4), (5, 4)), (GroupNorm(2, 4), (5, 4)),
                         (BatchRenorm1d(4, hold_steps=0, warmup_steps=0), (5, 4))]
    for layer, shape in layers_and_inputs:
        x = torch.randn(shape, generator=gen(7)).requires_grad_()
        (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.sum().backward()


# ----------------------------------------------------------------------------- batch renorm


def paper_batch_renorm(x, gamma, beta, mu, sigma2, eps, r_max, d_max):
    """Ioffe 2017, Algorithm 1, written out independently: y, r, d and the new-batch statistics.

    x is (N, C) or (N, C, L); mu and sigma2 are the running mean and variance before this
    batch. r and d are detached (stop_gradient), as the paper prescribes.
    """
    dims = (0,) if x.dim() == 2 else (0, 2)
    view = (1, -1) if x.dim() == 2 else (1, -1, 1)
    mu_b = x.mean(dims)
    var_b = ((x - mu_b.view(view)) ** 2).mean(dims)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(sigma2 + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    y = x_hat if gamma is None else gamma.view(view) * x_hat
    y = y if beta is None else y + beta.view(view)
    n = x.numel() // x.shape[1]
    return y, r, d, mu_b, var_b * n / (n - 1)


def bn_pair(num_features, g, dtype=torch.float32, momentum=0.1, affine=True, bias=True, **renorm):
    """bnexp.layers.BatchNorm1d and a BatchRenorm1d (with `renorm`'s arguments) holding the same state."""
    bn = randomize(BatchNorm1d(num_features, momentum=momentum, affine=affine, bias=bias, dtype=dtype), g)
    brn = BatchRenorm1d(num_features, momentum=momentum, affine=affine, dtype=dtype, bias=bias, **renorm)
    with torch.no_grad():  # running statistics away from (0, 1), as after some training
        bn.running_mean.copy_(randn(num_features, g, dtype, scale=2.0))
        bn.running_var.copy_(randn(num_features, g, dtype).abs() * 3 + 0.1)
    brn.load_state_dict(bn.state_dict(), strict=True)
    return bn, brn


def params_of(layer):
    return [p for p in (layer.weight, layer.bias) if p is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(momentum=None), dict(affine=False), dict(bias=False)])
@pytest.mark.parametrize("shape", [(60, 100), (8, 3, 5)])
@pytest.mark.parametrize("limits", [dict(r_max=1.0, d_max=0.0), dict(hold_steps=10)], ids=["r1d0", "held"])
def test_batch_renorm_with_unit_limits_is_batch_norm(shape, options, dtype, limits):
    """r_max=1, d_max=0 (set, or during the hold): outputs, gradients and running stats equal BatchNorm1d's
    over several training steps, then in evaluation."""
    g = gen(8)
    bn, brn = bn_pair(shape[1], g, dtype, **options, **limits)
    for step in range(4):
        x, upstream = randn(shape, g, dtype, scale=5.0, shift=2.0), randn(shape, g, dtype)
        assert_same(output_and_grads(brn, x, params_of(brn), upstream),
                    output_and_grads(bn, x, params_of(bn), upstream))
        for key, value in bn.state_dict().items():
            assert_close(brn.state_dict()[key], value, msg=lambda m: f"step {step}, {key}: {m}")
    bn.eval(), brn.eval()
    x, upstream = randn(shape, g, dtype, scale=5.0, shift=2.0), randn(shape, g, dtype)
    assert_same(output_and_grads(brn, x, params_of(brn), upstream), output_and_grads(bn, x, params_of(bn), upstream))


@pytest.mark.parametrize("shape", [(60, 100), (8, 40, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_renorm_matches_the_paper_with_clipping(shape, affine):
    """Output, gradients (r and d without gradient) and running stats equal Algorithm 1 written out in
    float64, over steps where r and d are clipped on some channels and not on others."""
    g = gen(9)
    c = shape[1]
    r_max, d_max, eps, momentum = 1.5, 0.5, 1e-3, 0.2
    _, brn = bn_pair(c, g, torch.float64, momentum=momentum, affine=affine, r_max=r_max, d_max=d_max,
                     hold_steps=0, warmup_steps=0)
    brn.eps = eps
    mu, sigma2 = brn.running_mean.clone(), brn.running_var.clone()
    clipped = {"r": [0, 0], "d": [0, 0]}  # [clipped, unclipped] channel counts over the steps
    for step in range(3):
        x = randn(shape, g, torch.float64, scale=2.0) * torch.linspace(0.3, 4.0, c).view(1, c, *[1] * (len(shape) - 2))
        x = x + randn(c, g, torch.float64).view(1, c, *[1] * (len(shape) - 2))
        upstream = randn(shape, g, torch.float64)
        gamma = None if brn.weight is None else brn.weight.detach().clone().requires_grad_()
        beta = None if brn.bias is None else brn.bias.detach().clone().requires_grad_()
        paper_params = [p for p in (gamma, beta) if p is not None]
        ours = output_and_grads(brn, x, params_of(brn), upstream)
        xp = x.clone().requires_grad_()
        y, r, d, mu_b, unbiased = paper_batch_renorm(xp, gamma, beta, mu, sigma2, eps, r_max, d_max)
        assert_same(ours, (y, torch.autograd.grad(y, [xp, *paper_params], upstream)))
        mu, sigma2 = (1 - momentum) * mu + momentum * mu_b, (1 - momentum) * sigma2 + momentum * unbiased
        assert_close(brn.running_mean, mu)
        assert_close(brn.running_var, sigma2)
        for name, at_bound in (("r", (r == r_max) | (r == 1 / r_max)), ("d", d.abs() == d_max)):
            clipped[name][0] += int(at_bound.sum())
            clipped[name][1] += int((~at_bound).sum())
    assert min(clipped["r"]) > 0 and min(clipped["d"]) > 0, clipped  # both regimes were exercised


def test_batch_renorm_gradient_differs_if_r_and_d_carried_gradient():
    """The check above can tell: letting gradient through r and d changes the input gradient."""
    g = gen(10)
    x, upstream = randn((16, 6), g, torch.float64, scale=3.0), randn((16, 6), g, torch.float64)
    mu, sigma2 = randn(6, g, torch.float64), torch.full((6,), 2.0, dtype=torch.float64)
    brn = BatchRenorm1d(6, r_max=10.0, d_max=10.0, hold_steps=0, warmup_steps=0, affine=False, dtype=torch.float64)
    with torch.no_grad():
        brn.running_mean.copy_(mu), brn.running_var.copy_(sigma2)
    _, (ours,) = output_and_grads(brn, x, [], upstream)

    def with_gradient_through_r_and_d(t):  # the same formula, r and d not detached
        mu_b, var_b = t.mean(0), t.var(0, correction=0)
        sigma_b, sigma = torch.sqrt(var_b + 1e-5), torch.sqrt(sigma2 + 1e-5)
        return (t - mu_b) / sigma_b * (sigma_b / sigma) + (mu_b - mu) / sigma  # unclipped: (t - mu) / sigma

    _, (leaky,) = output_and_grads(with_gradient_through_r_and_d, x, [], upstream)
    assert_close(leaky, upstream / torch.sqrt(sigma2 + 1e-5))  # the evaluation-mode gradient
    assert not torch.allclose(ours, leaky)


def test_renorm_limits_schedule():
    """The schedule's (r_max, d_max) at chosen steps: held at (1, 0), linear, then at the final values."""
    steps = (1, 100, 101, 300, 500, 10**6)
    at = {step: renorm_limits(step, 3.0, 5.0, hold_steps=100, warmup_steps=400) for step in steps}
    assert at[1] == at[100] == (1.0, 0.0)
    assert at[101] == pytest.approx((1.0 + 2.0 / 400, 5.0 / 400))
    assert at[300] == (2.0, 2.5)
    assert at[500] == at[10**6] == (3.0, 5.0)
    assert renorm_limits(1, 3.0, 5.0, hold_steps=0, warmup_steps=0) == (3.0, 5.0)
    assert renorm_limits(3, 2.0, 1.0, hold_steps=2, warmup_steps=0) == (2.0, 1.0)
    defaults = BatchRenorm1d(3)
    assert (defaults.r_max, defaults.d_max, defaults.hold_steps, defaults.warmup_steps) == (3.0, 5.0, 1000, 4000)
    assert defaults.limits(3000) == (2.0, 2.5)


def test_batch_renorm_module_follows_its_schedule():
    """Each training step uses the limits of its num_batches_tracked; evaluation does not advance them."""
    g = gen(11)
    brn = BatchRenorm1d(30, r_max=3.0, d_max=5.0, hold_steps=2, warmup_steps=4, dtype=torch.float64)
    with torch.no_grad():
        brn.running_mean.copy_(randn(30, g, torch.float64, scale=3.0))
        brn.running_var.copy_(randn(30, g, torch.float64).abs() * 4 + 0.05)
    expected_limits = [(1.0, 0.0), (1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]
    for step, limits in enumerate(expected_limits, start=1):
        assert brn.current_limits() == limits
        mu, sigma2 = brn.running_mean.clone(), brn.running_var.clone()
        x = randn((12, 30), g, torch.float64, scale=3.0, shift=1.0)
        want, *_ = paper_batch_renorm(x, brn.weight, brn.bias, mu, sigma2, brn.eps, *limits)
        assert_close(brn(x), want)
        assert int(brn.num_batches_tracked) == step
        brn.eval()
        brn(x)
        brn.train()
        assert int(brn.num_batches_tracked) == step


@pytest.mark.parametrize("shape", [(60, 100), (8, 3, 5)])
def test_batch_renorm_eval_uses_running_stats(shape):
    """Evaluation: y = weight * (x - running_mean) / sqrt(running_var + eps) + bias, as BatchNorm1d, buffers kept."""
    g = gen(12)
    bn, brn = bn_pair(shape[1], g, hold_steps=0, warmup_steps=0)
    bn.eval(), brn.eval()
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    x, upstream = randn(shape, g, scale=5.0, shift=2.0), randn(shape, g)
    view = (1, -1) if len(shape) == 2 else (1, -1, 1)
    formula = (x - brn.running_mean.view(view)) / torch.sqrt(brn.running_var.view(view) + brn.eps)
    assert_close(brn(x), formula * brn.weight.detach().view(view) + brn.bias.detach().view(view))
    assert_same(output_and_grads(brn, x, params_of(brn), upstream), output_and_grads(bn, x, params_of(bn), upstream))
    for key, value in brn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batch_renorm_state_and_interface_match_batch_norm():
    """Parameter and buffer names, state_dict keys (strict loading both ways), reset, repr."""
    for kwargs in [dict(), dict(affine=False), dict(bias=False)]:
        bn, brn = BatchNorm1d(5, **kwargs), BatchRenorm1d(5, **kwargs)
        assert list(brn.state_dict()) == list(bn.state_dict())
        assert [n for n, _ in brn.named_parameters()] == [n for n, _ in bn.named_parameters()]
        assert [n for n, _ in brn.named_buffers()] == [n for n, _ in bn.named_buffers()]
        brn.load_state_dict(bn.state_dict(), strict=True)
        bn.load_state_dict(brn.state_dict(), strict=True)
    brn = BatchRenorm1d(5)
    brn(torch.randn(4, 5))
    brn.reset_parameters()
    assert int(brn.num_batches_tracked) == 0 and torch.equal(brn.running_var, torch.ones(5))
    assert repr(brn) == ("BatchRenorm1d(5, eps=1e-05, momentum=0.1, r_max=3.0, d_max=5.0, warmup_steps=4000, "
                         "hold_steps=1000, affine=True, bias=True)")


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5,), (4, 6), (4, 6, 2), (1, 3)])
def test_batch_renorm_input_errors_match_batch_norm(shape):
    """Wrong dims, wrong channel count, one value per channel in training: BatchNorm1d's exceptions."""
    results = [raised(lambda: cls(3)(torch.randn(shape))) for cls in (BatchRenorm1d, BatchNorm1d)]
    assert results[0] == results[1] and results[0] is not None


def test_batch_renorm_rejects_bad_limits():
    """r_max < 1, d_max < 0 or negative step counts are refused at construction; the functional needs running stats."""
    for kwargs in [dict(r_max=0.5), dict(d_max=-1.0), dict(warmup_steps=-1), dict(hold_steps=-1)]:
        with pytest.raises(ValueError, match="BatchRenorm1d needs r_max >= 1"):
            BatchRenorm1d(3, **kwargs)
    with pytest.raises(ValueError, match="batch_renorm needs running_mean and running_var"):
        batch_renorm(torch.randn(4, 3), None, None, training=True)
    with pytest.raises(ValueError, match="batch_renorm needs r_max >= 1 and d_max >= 0"):
        batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, r_max=0.9)


def test_batch_renorm_gradcheck():
    """The analytic backward against finite differences (float64, momentum 0: the running stats stay put).

    Finite differences see r and d move with x, so training is checked where they cannot: r = 1,
    d = 0 (batch norm), and running stats so far off that every channel's r and d sit at a bound.
    """
    g = gen(13)
    far = (torch.full((4,), 5.0, dtype=torch.float64), torch.full((4,), 100.0, dtype=torch.float64))
    near = (randn(4, g, torch.float64), randn(4, g, torch.float64).abs() + 0.5)
    for shape in [(6, 4), (3, 4, 2)]:
        x = randn(shape, g, torch.float64, scale=2.0).requires_grad_()
        w, b = randn(4, g, torch.float64).requires_grad_(), randn(4, g, torch.float64).requires_grad_()
        for (mean, var), training, r_max, d_max in [(near, True, 1.0, 0.0), (far, True, 1.2, 0.3),
                                                    (near, False, 1.2, 0.3)]:
            def fn(x, w, b):
                return batch_renorm(x, mean, var, w, b, training, 0.0, 1e-3, r_max, d_max)
            assert torch.autograd.gradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------- from scratch

FORBIDDEN = [r"\bF\s*\.\s*(layer_norm|group_norm|batch_norm|instance_norm)\b",
             r"\bfunctional\s*\.\s*\w*_norm\b", r"\btorch\s*\.\s*(layer_norm|group_norm|batch_norm|native_\w+)\b",
             r"\baten\s*\.", r"\bnn\s*\.\s*(LayerNorm|GroupNorm|BatchNorm\w*)\b", r"_norm_impl",
             r"\bfrom\s+torch(\s*\.\s*\w+)*\s+import\b[^\n]*\b(\w+_norm|LayerNorm|GroupNorm|BatchNorm\w*)\b"]


@pytest.mark.parametrize("module", NORM_MODULES, ids=lambda module: module.__name__)
def test_normalization_modules_never_call_torch_norms(module):
    """No code token of the normalizations' modules names torch's layer, group or batch norm (docstrings may)."""
    source = (Path(module.__file__)).read_text()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    code = " ".join(t.string for t in tokens if t.type not in (tokenize.STRING, tokenize.COMMENT))
    assert [m.group(0) for p in FORBIDDEN for m in re.finditer(p, code)] == []
    assert re.search(FORBIDDEN[0], "y = F.layer_norm(x, (4,))") and re.search(FORBIDDEN[4], "nn . GroupNorm(2, 4)")


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_no_norm_kernel_runs():
    """At run time: no aten *_norm op dispatches for our three layers; it does for torch's."""
    def norm_ops(layer, shape):
        x = torch.randn(shape, requires_grad=True)
        with OpRecorder() as recorder:
            layer(x).sum().backward()
        return {op for op in recorder.ops if "norm" in op}

    assert norm_ops(torch.nn.LayerNorm(4), (3, 4)) and norm_ops(torch.nn.GroupNorm(2, 4), (3, 4, 2))
    for layer in (LayerNorm(4), GroupNorm(2, 4), BatchRenorm1d(4, hold_steps=0, warmup_steps=0)):
        for training in (True, False):
            assert norm_ops(layer.train(training), (3, 4, 2) if isinstance(layer, GroupNorm) else (3, 4)) == set()


AUTOGRAD_CASES = {  # name: (layer factory, input shape)
    "LayerNorm (N, D)": (lambda: LayerNorm(100), (60, 100)),
    "LayerNorm (N, C, D1, D2)": (lambda: LayerNorm((3, 5), bias=False), (4, 2, 3, 5)),
    "GroupNorm (N, C)": (lambda: GroupNorm(4, 100), (60, 100)),
    "GroupNorm (N, C, L)": (lambda: GroupNorm(3, 6, affine=False), (8, 6, 5)),
    "BatchRenorm1d (N, C)": (lambda: BatchRenorm1d(100, r_max=1.5, d_max=0.5, hold_steps=1, warmup_steps=2), (60, 100)),
    "BatchRenorm1d (N, C, L)": (lambda: BatchRenorm1d(6, momentum=None, hold_steps=0, warmup_steps=0), (8, 6, 5)),
}


@pytest.mark.parametrize("name", list(AUTOGRAD_CASES))
def test_analytic_backward_equals_plain_autograd(name):
    """autograd_forward (the bench's baseline) and the layer: outputs, gradients and state over
    training steps and in evaluation (float64)."""
    make, shape = AUTOGRAD_CASES[name]
    g = gen(16)
    ours, plain = randomize(make().double(), g), make().double()
    plain.load_state_dict(ours.state_dict(), strict=True)
    for step in range(4):
        ours.train(step < 3), plain.train(step < 3)
        x, upstream = randn(shape, g, torch.float64, 4.0, 1.0), randn(shape, g, torch.float64)
        assert_same(output_and_grads(ours, x, params_of(ours), upstream),
                    output_and_grads(lambda t: autograd_forward(plain, t), x, params_of(plain), upstream))
        for key, value in ours.state_dict().items():
            assert_close(plain.state_dict()[key], value)


@pytest.mark.parametrize("module", NORM_MODULES, ids=lambda module: module.__name__)
def test_normalization_modules_are_leaves(module):
    """The normalizations' modules import torch and each other only: bnexp.layers imports them, not the
    reverse. norm_common imports nothing from bnexp and the layers only norm_common (their autograd
    reference, bnexp/nn/norm_autograd.py, imports the layers, not the reverse)."""
    import ast

    def bnexp_imports(nodes):
        names = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in nodes if isinstance(node, ast.ImportFrom)}
        return {name for name in names if name.startswith("bnexp")}

    tree = ast.parse(Path(module.__file__).read_text())
    ours = {m.__name__ for m in NORM_MODULES}
    assert bnexp_imports(ast.walk(tree)) <= ours - {module.__name__}, bnexp_imports(ast.walk(tree))
    at_module_level = bnexp_imports(tree.body)
    assert at_module_level == (set() if module is norm_common else {norm_common.__name__}), at_module_level


def test_layers_re_exports_the_normalizations():
    """bnexp.layers gives the same objects, so every layer imports from one place."""
    for module, names in ((layer_norm_module, ("LayerNorm", "layer_norm")),
                          (group_norm_module, ("GroupNorm", "group_norm")),
                          (batch_renorm_module, ("BatchRenorm1d", "batch_renorm"))):
        for name in names:
            assert getattr(layers, name) is getattr(module, name)
