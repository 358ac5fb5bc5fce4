"""Layer norm, group norm and batch renormalization, written from their formulas.

``layer_norm`` / ``LayerNorm`` and ``group_norm`` / ``GroupNorm`` are drop-in replacements
for torch's (same signatures, parameter names, state_dict keys, repr and error messages);
``batch_renorm`` / ``BatchRenorm1d`` is batch renormalization (Ioffe 2017), which torch does
not have, with the parameters and buffers of ``BatchNorm1d``. All three are built from
tensor arithmetic only. They differ in which values share one mean and one variance:

    layer norm      each sample's last D values (D = prod(normalized_shape))
    group norm      each sample's C / G channels of one group, times every position L
    batch renorm    each channel's n values over the batch, as in batch norm

and every one then computes, over the m values of such a set (biased variance):

    mean    = sum(x) / m
    var     = sum((x - mean)^2) / m
    x_hat   = (x - mean) / sqrt(var + eps)
    y       = weight * x_hat + bias

Layer and group norm treat training and evaluation alike (no running statistics), and the
weight and bias are per element of normalized_shape (layer norm) or per channel (group norm).
Backward, from dy = dL/dy, for each set of m values (g = weight * dy, broadcast):

    dbias   = sum(dy)        over what shares a weight (the batch, and L for group norm)
    dweight = sum(dy * x_hat)
    dx      = (g - sum(g) / m - x_hat * sum(g * x_hat) / m) / sqrt(var + eps)   sums over the set

Batch renorm's formulas, with the two correction factors r and d, are in ``BatchRenorm1d``.

Reading order, per normalization: ``*_forward_formulas`` and ``*_backward_formulas`` are
the two blocks above; a ``*Function`` hands them to autograd; then the functional and the
module front doors. ``autograd_forward`` runs a layer's forward formulas under plain
autograd instead: the analytic backward is kept because it is faster than that at the
harness's 60 x 100 batches for all three (scripts/bench.py --sections norms prints both).
The "speed" section at the end holds the one per-call trick kept here. Nothing here imports
from bnexp (bnexp.layers re-exports this module's classes: importing it back would be a circle).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "layer_norm", "LayerNorm", "LayerNormFunction", "layer_norm_forward_formulas",
    "layer_norm_backward_formulas", "check_layer_norm_args",
    "group_norm", "GroupNorm", "GroupNormFunction", "group_norm_forward_formulas",
    "group_norm_backward_formulas", "check_group_norm_args",
    "batch_renorm", "BatchRenorm1d", "BatchRenormFunction", "batch_renorm_forward_formulas",
    "batch_renorm_backward_formulas", "check_batch_renorm_args", "renorm_limits", "autograd_forward",
]


def _set_moments(x: Tensor, dim: int, m, eps) -> tuple[Tensor, Tensor]:
    """x_hat = (x - mean) / sqrt(var + eps) and 1 / sqrt(var + eps), over the m values along `dim`.

    m and eps are numbers or 0-dim tensors holding them; the statistics keep their dim.
    """
    mean = x.sum(dim, keepdim=True) / m
    centered = x - mean
    var = (centered * centered).sum(dim, keepdim=True) / m  # biased: divide by m
    rstd = torch.rsqrt(var + eps)
    return centered * rstd, rstd


def _set_backward(g: Tensor, x_hat: Tensor, rstd: Tensor, dim: int, m) -> Tensor:
    """dx of a normalization over the m values along `dim`, from g = weight * dy.

    The bracket's correction is the gradient's share through mean and var, which are
    computed from x.
    """
    return (g - (g.sum(dim, keepdim=True) + x_hat * (g * x_hat).sum(dim, keepdim=True)) / m) * rstd


# ----------------------------------------------------------------------------- layer norm


def layer_norm_forward_formulas(x: Tensor, weight: Tensor | None, bias: Tensor | None, d, eps):
    """Layer norm of the rows of x, shape (M, D): (y, x_hat, 1/sqrt(var + eps)).

    weight and bias have D values each (or are None); d (= D) and eps are numbers or 0-dim
    tensors. Differentiable by autograd as written (the plain-autograd row of the bench).
    """
    x_hat, rstd = _set_moments(x, 1, d, eps)
    if weight is None:
        y = x_hat if bias is None else x_hat + bias
    else:  # addcmul(b, t, w) is b + t * w in one pass
        y = x_hat * weight if bias is None else torch.addcmul(bias, x_hat, weight)
    return y, x_hat, rstd


def layer_norm_backward_formulas(dy: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor | None, d):
    """(dx, dweight, dbias) of layer norm from dy (M, D) and what the forward formulas returned."""
    dx = _set_backward(dy if weight is None else dy * weight, x_hat, rstd, 1, d)
    return dx, (dy * x_hat).sum(0), dy.sum(0)


def _layer_norm_rows(x: Tensor, weight: Tensor | None, bias: Tensor | None, normalized_ndim: int, eps: float):
    """x as (M, D) rows, weight and bias as D values, and D and eps as cached 0-dim tensors."""
    d = math.prod(x.shape[x.dim() - normalized_ndim:])
    if x.dim() != 2:  # (*, D1, D2, ...): rows of D = D1 * D2 * ... values
        x = x.reshape(math.prod(x.shape[:x.dim() - normalized_ndim]), d)
    if weight is not None and weight.dim() != 1:
        weight = weight.reshape(d)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(d)
    d, eps, _ = _constants(d, eps, x.dtype, x.device)
    return x, weight, bias, d, eps


class LayerNormFunction(torch.autograd.Function):
    """Layer norm over the last ``normalized_ndim`` dims of x, with the analytic backward.

    x is read as (M, D) rows inside (reshapes autograd does not record). Saved for
    backward: x_hat (M * D values), 1/std (M) and the weight (D).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_ndim, eps):
        ctx.shape, ctx.normalized_shape = x.shape, x.shape[x.dim() - normalized_ndim:]
        x, weight, bias, d, eps = _layer_norm_rows(x, weight, bias, normalized_ndim, eps)
        y, x_hat, rstd = layer_norm_forward_formulas(x, weight, bias, d, eps)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.d = d
        return y.view(ctx.shape)

    @staticmethod
    def backward(ctx, dy):
        return (_layer_norm_backward_once if torch.is_grad_enabled() else _layer_norm_backward)(ctx, dy)


def _layer_norm_backward(ctx, dy):
    """LayerNormFunction's backward: the formulas, and None for what needs no gradient."""
    x_hat, rstd, weight = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward_formulas(dy.reshape(x_hat.shape), x_hat, rstd, weight, ctx.d)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (dx.view(ctx.shape) if need_x else None, dweight.view(ctx.normalized_shape) if need_weight else None,
            dbias.view(ctx.normalized_shape) if need_bias else None, None, None)


def _as_int(value) -> int | None:
    """value as an int where torch's argument parser takes it as one (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # ints, numpy ints, one-element integer tensors
    except TypeError:
        return None


def check_layer_norm_args(input: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None) -> list[int]:
    """Raise torch's exception, with torch's message, for the first bad argument of layer_norm.

    The order is torch's: the type of normalized_shape (a TypeError, as torch's argument
    parser raises: it looks at the first element, and fails differently on a later one),
    then normalized_shape, weight, bias and the input's trailing sizes. Returns the shape.
    """
    name = "layer_norm(): argument 'normalized_shape'"
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name} (position 2) must be tuple of ints, not {type(normalized_shape).__name__}")
    shape = [_as_int(size) for size in normalized_shape]
    for pos, size in enumerate(shape):
        kind = type(normalized_shape[pos]).__name__
        if size is None and pos == 0:
            raise TypeError(f"{name} (position 2) must be tuple of ints, but found element of type {kind} at pos 0")
        if size is None:
            raise TypeError(f'{name} failed to unpack the object at pos 2 with error "type must be tuple of '
                            f'ints,but got {kind}"')
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           f"least one element, but got normalized_shape = {shape}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and list(tensor.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} "
                               f"of shape {list(tensor.shape)} and normalized_shape = {shape}")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={shape}, expected input with shape "
                           f"[*{''.join(f', {s}' for s in shape)}], but got input of size{list(input.shape)}")
    return shape


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer-normalize ``input`` over its last ``len(normalized_shape)`` dims, like ``F.layer_norm``.

    normalized_shape is a tuple or list of ints (as in torch, not a bare int: the module
    takes that); weight and bias, when given, have exactly that shape.
    """
    shape = check_layer_norm_args(input, normalized_shape, weight, bias)
    return LayerNormFunction.apply(input, weight, bias, len(shape), eps)


class LayerNorm(nn.Module):
    r"""Layer normalization over the last dimensions of the input, written from the formulas.

    A drop-in for ``torch.nn.LayerNorm`` (Ba, Kiros & Hinton 2016,
    https://arxiv.org/abs/1607.06450): same arguments, parameters ``weight`` and ``bias``
    under the same names, the same repr and errors, so a ``state_dict`` loads strictly into
    either class.

    Each sample is normalized on its own: with ``normalized_shape`` of D values in all,
    every input of shape (*, normalized_shape) is read as rows of D values x_1 .. x_D, and

    .. math::

        \mu = \frac{1}{D} \sum_i x_i \qquad
        \sigma^2 = \frac{1}{D} \sum_i (x_i - \mu)^2

        \hat{x}_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}} \qquad
        y_i = \gamma_i \hat{x}_i + \beta_i

    with the *biased* variance (divide by D). Unlike batch norm, nothing is shared across
    the batch: a batch of one works, training and evaluation compute the same thing, and
    there are no running statistics. :math:`\gamma` and :math:`\beta` have the shape of
    ``normalized_shape``: one scale and shift per normalized position, not per sample.

    The backward, with :math:`g_i = \gamma_i\,\partial L / \partial y_i`, is

    .. math::

        \frac{\partial L}{\partial x_i} = \frac{1}{\sqrt{\sigma^2 + \epsilon}}
        \Big(g_i - \frac{1}{D}\sum_j g_j - \hat{x}_i \frac{1}{D}\sum_j g_j \hat{x}_j\Big)

    where the two sums are the gradient's share through :math:`\mu` and :math:`\sigma^2`.

    Args:
        normalized_shape: an int D, or the trailing shape (D1, D2, ...) to normalize over
        eps: added to the variance before the square root. Default: 1e-5
        elementwise_affine: learn ``weight`` (init 1) and ``bias`` (init 0) of shape
            ``normalized_shape``; when ``False`` both are ``None``. Default: ``True``
        bias: with ``elementwise_affine``, also learn the shift. Default: ``True``
        device, dtype: where and in which precision the parameters are made

    Shape:
        - Input: (*, normalized_shape), any number of leading dims (none included)
        - Output: same shape as the input

    Gradients: first derivatives for input, weight and bias; differentiating a gradient
    raises torch's ``once_differentiable`` RuntimeError (torch's own layer supports it).

    Example::

        >>> m = LayerNorm(100)
        >>> x = torch.randn(20, 100) * 3 + 5
        >>> y = m(x)  # each row of y has mean 0 and variance ~1
        >>> m2 = LayerNorm((4, 5), elementwise_affine=False)
        >>> y2 = m2(torch.randn(2, 3, 4, 5))  # 6 sets of 20 values
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        like = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, **like)) if elementwise_affine else None
        self.bias = (nn.Parameter(torch.empty(self.normalized_shape, **like))
                     if elementwise_affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1 and bias 0 (when there are)."""
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------- group norm


def group_norm_forward_formulas(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, m, eps):
    """Group norm of x, shape (N, C, S) (S: the positions, 1 for an (N, C) input):
    (y, x_hat, 1/sqrt(var + eps)), x_hat as (N, G, m) and 1/std as (N, G, 1).

    weight and bias have C values each (or are None); m (= C / G * S, the values of a
    group) and eps are numbers or 0-dim tensors. Differentiable by autograd as written.
    """
    n, c, s = x.shape
    x_hat, rstd = _set_moments(x.reshape(n, num_groups, c // num_groups * s), 2, m, eps)
    per_channel = x_hat.view(n, c, s)
    if weight is None:
        y = per_channel if bias is None else per_channel + bias.view(c, 1)
    elif bias is None:
        y = per_channel * weight.view(c, 1)
    else:
        y = torch.addcmul(bias.view(c, 1), per_channel, weight.view(c, 1))
    return y, x_hat, rstd


def group_norm_backward_formulas(dy: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor | None, m):
    """(dx, dweight, dbias) of group norm: dy (N, C, S), x_hat and 1/std as the forward returned them."""
    n, c, s = dy.shape
    g = dy if weight is None else dy * weight.view(c, 1)
    dx = _set_backward(g.reshape(x_hat.shape), x_hat, rstd, 2, m).view(n, c, s)
    return dx, (dy * x_hat.view(n, c, s)).sum((0, 2)), dy.sum((0, 2))


def _group_norm_positions(x: Tensor, num_groups: int, eps: float):
    """x as (N, C, S), and the group size m = C / G * S and eps as cached 0-dim tensors."""
    if x.dim() != 3:  # (N, C) or (N, C, H, W, ...): S = 1 or H * W * ...
        x = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    m, eps, _ = _constants(x.shape[1] // num_groups * x.shape[2], eps, x.dtype, x.device)
    return x, m, eps


class GroupNormFunction(torch.autograd.Function):
    """Group norm of x, shape (N, C, *), with the analytic backward.

    x is read as (N, C, S) inside (reshapes autograd does not record). Saved for backward:
    x_hat (N * C * S values), 1/std (N * G) and the weight (C).
    """

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        ctx.shape = x.shape
        x, m, eps = _group_norm_positions(x, num_groups, eps)
        y, x_hat, rstd = group_norm_forward_formulas(x, num_groups, weight, bias, m, eps)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.m, ctx.positions_shape = m, x.shape
        return y.view(ctx.shape)

    @staticmethod
    def backward(ctx, dy):
        return (_group_norm_backward_once if torch.is_grad_enabled() else _group_norm_backward)(ctx, dy)


def _group_norm_backward(ctx, dy):
    """GroupNormFunction's backward: the formulas, and None for what needs no gradient."""
    x_hat, rstd, weight = ctx.saved_tensors
    dx, dweight, dbias = group_norm_backward_formulas(dy.reshape(ctx.positions_shape), x_hat, rstd, weight, ctx.m)
    need_x, _, need_weight, need_bias = ctx.needs_input_grad[:4]
    return (dx.view(ctx.shape) if need_x else None, None, dweight if need_weight else None,
            dbias if need_bias else None, None)


def check_group_norm_args(input: Tensor, num_groups, weight: Tensor | None, bias: Tensor | None) -> int:
    """Raise torch's exception, with torch's message, for the first bad argument of group_norm.

    In torch's order: at least 2 dims; more than one value per group (F.group_norm's own
    check; num_groups=0 fails there with Python's ZeroDivisionError, as in torch); the
    type of num_groups; channels, positions and groups > 0; channels divisible by groups;
    weight; bias. Returns num_groups as an int.
    """
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    size = [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:])
    if math.prod(size[:1] + size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    groups = _as_int(num_groups)
    if groups is None:
        raise TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, "
                        f"not {type(num_groups).__name__}")
    num_groups = groups
    channels, positions = input.shape[1], math.prod(input.shape[2:])
    if channels <= 0:
        raise RuntimeError(f"Expected number of channels to be greater than 0, got {channels}")
    if positions <= 0:
        raise RuntimeError(f"Expected HxW to be greater than 0, got {positions}")
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if channels % num_groups != 0:
        raise RuntimeError("Expected number of channels in input to be divisible by num_groups, but got "
                           f"input of shape {list(input.shape)} and num_groups={num_groups}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dim() != 1 or tensor.numel() != channels):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in "
                               f"input, but got {name} of shape {list(tensor.shape)} and input of shape "
                               f"{list(input.shape)}")
    return num_groups


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Group-normalize ``input`` of shape (N, C, *) in ``num_groups`` groups of channels, like ``F.group_norm``.

    weight and bias, when given, have C values (one per channel).
    """
    num_groups = check_group_norm_args(input, num_groups, weight, bias)
    return GroupNormFunction.apply(input, num_groups, weight, bias, eps)


class GroupNorm(nn.Module):
    r"""Group normalization over groups of channels, written from the formulas.

    A drop-in for ``torch.nn.GroupNorm`` (Wu & He 2018, https://arxiv.org/abs/1803.08494):
    same arguments, parameters ``weight`` and ``bias`` under the same names, the same repr
    and errors, so a ``state_dict`` loads strictly into either class.

    The C channels are split into G groups of C / G consecutive channels. For each sample
    and group, the m = (C / G) * L values of the group's channels at every position
    (L = 1 for an (N, C) input, the product of the trailing sizes otherwise) share one
    mean and one *biased* variance:

    .. math::

        \mu_{ng} = \frac{1}{m} \sum_{c \in g,\, l} x_{ncl} \qquad
        \sigma^2_{ng} = \frac{1}{m} \sum_{c \in g,\, l} (x_{ncl} - \mu_{ng})^2

        \hat{x}_{ncl} = \frac{x_{ncl} - \mu_{ng}}{\sqrt{\sigma^2_{ng} + \epsilon}} \qquad
        y_{ncl} = \gamma_c \hat{x}_{ncl} + \beta_c

    The scale and shift are per channel, as in batch norm, while the statistics are per
    sample, as in layer norm: G = 1 is layer norm over (C, L) with per-channel affine, and
    G = C normalizes each channel of each sample alone (instance norm). Nothing is shared
    across the batch, so training and evaluation compute the same thing.

    The backward for one group, with :math:`g = \gamma_c\,\partial L / \partial y`, is
    layer norm's: :math:`\partial L / \partial x = (g - \overline{g} - \hat{x}\,
    \overline{g \hat{x}}) / \sqrt{\sigma^2 + \epsilon}` with the bars the means over the
    group's m values.

    Args:
        num_groups: number of groups G; must divide num_channels
        num_channels: number of channels C of the input
        eps: added to the variance before the square root. Default: 1e-5
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0). Default: ``True``
        device, dtype: where and in which precision the parameters are made
        bias: with ``affine``, also learn the shift (keyword only, as in torch). Default: ``True``

    Shape:
        - Input: (N, C, *): (N, C), (N, C, L), (N, C, H, W), ...
        - Output: same shape as the input

    Gradients: first derivatives for input, weight and bias; differentiating a gradient
    raises torch's ``once_differentiable`` RuntimeError (torch's own layer supports it).

    Example::

        >>> m = GroupNorm(4, 100)  # 4 groups of 25 channels
        >>> x = torch.randn(20, 100, 7)
        >>> y = m(x)  # per sample and group, the 25 * 7 values have mean 0, variance ~1
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        like = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_channels, **like)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_channels, **like)) if affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1 and bias 0 (when there are)."""
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------- batch renorm


def renorm_limits(step: int, r_max: float, d_max: float, hold_steps: int, warmup_steps: int) -> tuple[float, float]:
    """The clipping limits (r_max, d_max) in force at training batch number `step` (1, 2, ...).

    Batches 1 .. hold_steps use (1, 0): r = 1 and d = 0, batch norm exactly. Then both
    relax linearly, reaching (r_max, d_max) at batch hold_steps + warmup_steps and staying
    there: with p = clamp((step - hold_steps) / warmup_steps, 0, 1),

        r_max(step) = 1 + p * (r_max - 1)        d_max(step) = p * d_max

    warmup_steps=0 switches from (1, 0) to (r_max, d_max) right after the hold.
    """
    if step <= hold_steps:
        return 1.0, 0.0
    if step >= hold_steps + warmup_steps:
        return float(r_max), float(d_max)
    p = (step - hold_steps) / warmup_steps
    return 1.0 + p * (r_max - 1.0), p * d_max


def batch_renorm_forward_formulas(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                                  running_mean: Tensor, running_var: Tensor, n, eps, r_max: float,
                                  d_max: float, training: bool):
    """Batch renorm of the n rows of x (n, C): (y, x - mean, 1/sigma_B, r, d, mean, var).

    Training uses the batch's mean and biased variance and the corrections r and d from
    the running statistics (which it does not change); evaluation uses the running
    statistics with r = 1 and d = 0 (returned as None). n and eps are numbers or 0-dim
    tensors. Differentiable by autograd as written, with r and d detached: no gradient
    flows through them.
    """
    if training:
        mean = x.sum(0) / n
        centered = x - mean
        var = (centered * centered).sum(0) / n  # biased: used to normalize
        inv_std = torch.rsqrt(var + eps)  # 1 / sigma_B
        with torch.no_grad():  # r and d are constants to backprop (Ioffe 2017, Algorithm 1)
            sigma = torch.sqrt(running_var + eps)
            r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean) / sigma).clamp(-d_max, d_max)
        # y = weight * (x_hat * r + d) + bias = centered * (weight * r / sigma_B) + (weight * d + bias)
        scale = inv_std * r if weight is None else weight * (inv_std * r)
        shift = d if weight is None else weight * d
        shift = shift if bias is None else bias + shift
    else:  # evaluation: the running estimates, batch norm's formula
        mean, var, r, d = running_mean, running_var, None, None
        centered = x - mean
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else weight * inv_std
        shift = bias
    y = centered * scale if shift is None else torch.addcmul(shift, centered, scale)
    return y, centered, inv_std, r, d, mean, var


def batch_renorm_backward_formulas(dy: Tensor, centered: Tensor, inv_std: Tensor, weight: Tensor | None,
                                   r: Tensor | None, d: Tensor | None, n):
    """(dx, dweight, dbias) of batch renorm, r and d held constant (None: evaluation mode)."""
    x_hat = centered * inv_std
    dbias = dy.sum(0)
    dxhat_sum = (dy * x_hat).sum(0)
    if r is None:  # evaluation: mean and var are constants
        return dy * (inv_std if weight is None else weight * inv_std), dxhat_sum, dbias
    dweight = dxhat_sum * r + dbias * d  # sum(dy * (x_hat * r + d))
    scale = inv_std * r if weight is None else weight * (inv_std * r)
    dx = (dy - (dbias + x_hat * dxhat_sum) / n) * scale
    return dx, dweight, dbias


class BatchRenormFunction(torch.autograd.Function):
    """Batch renorm of (n, C) rows with the analytic backward; updates the running stats in forward.

    Saved for backward: x - mean (n * C values), 1/sigma_B, r, d and the weight (C each).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, r_max, d_max):
        y, centered, inv_std, r, d, n = _batch_renorm_rows(x, weight, bias, running_mean, running_var,
                                                           training, momentum, eps, r_max, d_max)
        ctx.save_for_backward(centered, inv_std, weight, r, d)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, dy):
        return (_batch_renorm_backward_once if torch.is_grad_enabled() else _batch_renorm_backward)(ctx, dy)


def _batch_renorm_rows(x, weight, bias, running_mean, running_var, training, momentum, eps, r_max, d_max):
    """The forward formulas on (n, C) rows, then the running statistics' update in training:
    (y, x - mean, 1/sigma_B, r, d, n as a 0-dim tensor)."""
    n, eps, bessel = _constants(x.shape[0], eps, x.dtype, x.device)
    y, centered, inv_std, r, d, mean, var = batch_renorm_forward_formulas(
        x, weight, bias, running_mean, running_var, n, eps, r_max, d_max, training)
    if training:  # after r and d: they use the running statistics from before this batch
        with torch.no_grad():  # (already so in BatchRenormFunction; not under autograd_forward)
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * bessel, momentum)  # the unbiased var * n / (n - 1), as batch norm
    return y, centered, inv_std, r, d, n


def _batch_renorm_backward(ctx, dy):
    """BatchRenormFunction's backward: the formulas, and None for what needs no gradient."""
    centered, inv_std, weight, r, d = ctx.saved_tensors
    dx, dweight, dbias = batch_renorm_backward_formulas(dy, centered, inv_std, weight, r, d, ctx.n)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (dx if need_x else None, dweight if need_weight else None, dbias if need_bias else None,
            None, None, None, None, None, None, None)


def check_batch_renorm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                            r_max, d_max) -> None:
    """Raise a ValueError/TypeError naming the bad argument of batch_renorm (batch_norm's messages)."""
    if input.dim() < 2:
        raise ValueError(f"batch_renorm expects input of shape (N, C, *) (got {input.dim()}D input)")
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var, in training too (r and d "
                         f"compare the batch with them) (got running_mean={_describe(running_mean)}, "
                         f"running_var={_describe(running_var)})")
    channels = input.shape[1]
    for name, vector in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        if vector is not None and vector.numel() != channels:
            raise ValueError(f"expected {name} with {channels} elements, one per channel of the input "
                             f"(got {vector.numel()}; input size {tuple(input.shape)})")
    if training:
        if input.numel() // max(channels, 1) == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"batch_renorm eps must be positive during training, but got {eps}")
        if not isinstance(momentum, (int, float)):
            raise TypeError(f"batch_renorm momentum must be a float, got {momentum!r}")
        if not r_max >= 1.0 or not d_max >= 0.0:
            raise ValueError(f"batch_renorm needs r_max >= 1 and d_max >= 0 (got r_max={r_max}, d_max={d_max})")
    elif eps < 0.0:
        raise ValueError(f"batch_renorm eps must be non-negative, but got {eps}")


def _describe(tensor: Tensor | None) -> str:
    return "None" if tensor is None else f"a tensor of size {tuple(tensor.shape)}"


def batch_renorm(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None = None,
                 bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
                 eps: float = 1e-5, r_max: float = 3.0, d_max: float = 5.0) -> Tensor:
    """Batch-renormalize ``input`` of shape (N, C, *) per channel C (Ioffe 2017), ``F.batch_norm``'s arguments.

    training=True normalizes with the batch statistics, corrected by r and d (clipped to
    [1/r_max, r_max] and [-d_max, d_max]) computed against running_mean / running_var,
    which are then updated in place as batch norm does (``momentum``, unbiased variance).
    r_max and d_max are the limits in force now (no schedule here: ``BatchRenorm1d``
    keeps one; ``renorm_limits`` computes it). r_max=1, d_max=0 is batch norm.
    training=False is batch norm's evaluation: the running statistics alone.
    """
    check_batch_renorm_args(input, running_mean, running_var, weight, bias, training, momentum, eps, r_max, d_max)
    return _on_rows(BatchRenormFunction.apply, input, weight, bias, running_mean, running_var, training,
                    momentum, eps, r_max, d_max)


def _on_rows(fn, input: Tensor, *args):
    """fn(rows, *args) on (N, C) rows: the input itself, or for (N, C, L, ...) its N * L * ...
    rows of C channels (a copy each way)."""
    if input.dim() == 2:
        return fn(input, *args)
    channels_last = input.movedim(1, -1)
    y = fn(channels_last.reshape(-1, input.shape[1]), *args)
    return y.view(channels_last.shape).movedim(-1, 1).contiguous()


class BatchRenorm1d(nn.Module):
    r"""Batch renormalization over a 2D (N, C) or 3D (N, C, L) input (Ioffe 2017), from the formulas.

    Batch renormalization (https://arxiv.org/abs/1702.03275) makes training use the same
    normalization as evaluation, in expectation, while still normalizing with the batch.
    In training, per channel over the n = N (or N * L) values of the batch, with the batch
    statistics :math:`\mu_B, \sigma_B` and the running ones :math:`\mu, \sigma`:

    .. math::

        \mu_B = \frac{1}{n} \sum_j x_j \qquad
        \sigma_B = \sqrt{\frac{1}{n} \sum_j (x_j - \mu_B)^2 + \epsilon} \qquad
        \sigma = \sqrt{\hat{\sigma}^2 + \epsilon}

        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big) \qquad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

        y_j = \gamma \Big(\frac{x_j - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    Unclipped, :math:`\frac{x - \mu_B}{\sigma_B} r + d = \frac{x - \mu}{\sigma}`: the output
    is what evaluation mode would give. r and d are treated as constants by backprop
    (``stop_gradient`` in the paper): the gradient is batch norm's with the weight scaled
    by r, :math:`\partial L/\partial \gamma = \sum_j \partial L/\partial y_j\,(\hat{x}_j r + d)`.
    r and d use the running statistics from before this batch, which are then updated
    exactly as ``BatchNorm1d`` does: :math:`\hat{\mu}` with :math:`\mu_B`,
    :math:`\hat{\sigma}^2` with the *unbiased* batch variance :math:`\frac{n}{n-1}
    (\sigma_B^2 - \epsilon)`, by ``momentum`` (``None``: cumulative average), and
    ``num_batches_tracked`` counts training batches. Evaluation mode is batch norm's:
    :math:`y = \gamma (x - \hat{\mu}) / \sigma + \beta`.

    Schedule. Early running statistics are poor, so the paper starts as batch norm
    (r_max = 1, d_max = 0, which force r = 1, d = 0) and relaxes the limits later; it held
    them for 5k steps, then reached d_max = 5 at 25k and r_max = 3 at 40k steps. Here one
    linear ramp serves both, counted by ``num_batches_tracked`` (k = 1 for the first
    training batch): batches k <= ``hold_steps`` are batch norm; from there the limits grow
    linearly and reach ``r_max`` and ``d_max`` at k = ``hold_steps + warmup_steps``:

    .. math::

        p = \mathrm{clip}_{[0, 1]}\Big(\frac{k - \text{hold\_steps}}{\text{warmup\_steps}}\Big)
        \qquad r_{max}(k) = 1 + p\,(r_{max} - 1) \qquad d_{max}(k) = p\, d_{max}

    The defaults (hold 1000, warmup 4000) scale the paper's schedule to this harness's
    8000-step runs: batch norm for the first eighth, full limits from step 5000.
    ``hold_steps=0, warmup_steps=0`` applies r_max and d_max from the first batch.
    ``current_limits()`` returns the limits the next training batch will use.

    Args:
        num_features: number of features or channels C of the input
        eps: added to the variances before the square roots. Default: 1e-5
        momentum: weight of the newest batch in the running estimates; ``None`` for a
            cumulative average. Default: 0.1
        r_max: final bound of r, in [1/r_max, r_max]; >= 1. Default: 3.0 (the paper's)
        d_max: final bound of d, in [-d_max, d_max]; >= 0. Default: 5.0 (the paper's)
        warmup_steps: training batches over which the limits grow from (1, 0) to
            (r_max, d_max), after the hold. Default: 4000
        hold_steps: first training batches that use (1, 0): batch norm. Default: 1000
        affine: learnable per-channel ``weight`` (init 1) and ``bias`` (init 0). Default: ``True``
        device, dtype: where and in which precision parameters and buffers are made
        bias: with ``affine``, also learn the shift (keyword only). Default: ``True``

    Parameters and buffers are ``BatchNorm1d``'s (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``): the same state_dict keys, logged the same
    way. There is no ``track_running_stats``: r and d need the running statistics.

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: same shape as the input

    Gradients: first derivatives for input, weight and bias; differentiating a gradient
    raises torch's ``once_differentiable`` RuntimeError.

    Example::

        >>> m = BatchRenorm1d(100, hold_steps=0, warmup_steps=0)  # limits 3 and 5 at once
        >>> x = torch.randn(20, 100) * 3 + 5
        >>> y = m(x)  # training: r and d pull y towards (x - running_mean) / sigma, clipped
        >>> m.eval()
        >>> y = m(x)  # evaluation: batch norm with m.running_mean and m.running_var
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 4000, hold_steps: int = 1000,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if not r_max >= 1.0 or not d_max >= 0.0 or warmup_steps < 0 or hold_steps < 0:
            raise ValueError("BatchRenorm1d needs r_max >= 1, d_max >= 0, warmup_steps >= 0 and hold_steps >= 0 "
                             f"(got {r_max}, {d_max}, {warmup_steps}, {hold_steps})")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.hold_steps = hold_steps
        self.affine = affine
        like = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **like)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **like)) if affine and bias else None
        self.register_buffer("running_mean", torch.zeros(num_features, **like))
        self.register_buffer("running_var", torch.ones(num_features, **like))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen (the schedule starts over)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def limits(self, step: int) -> tuple[float, float]:
        """(r_max, d_max) in force at training batch number `step` (1, 2, ...): the schedule."""
        return renorm_limits(step, self.r_max, self.d_max, self.hold_steps, self.warmup_steps)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) the next training batch will use."""
        return self.limits(int(self.num_batches_tracked) + 1)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, warmup_steps={self.warmup_steps}, hold_steps={self.hold_steps}, "
                f"affine={self.affine}, bias={self.bias is not None}")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} features in dim 1 "
                             f"(got {input.shape[1]}; input size {tuple(input.shape)})")

    def _count_batch(self) -> tuple[float, float, float]:
        """In training, count this batch; (momentum, r_max, d_max) for it (limits unused in evaluation)."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if not self.training:
            return momentum, 1.0, 0.0
        self.num_batches_tracked.add_(1)
        step = int(self.num_batches_tracked)  # note: a host sync on a GPU
        if self.momentum is None:  # torch's rule: a cumulative average of all batches so far
            momentum = 1.0 / step
        return (momentum, *self.limits(step))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum, r_max, d_max = self._count_batch()
        return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, momentum, self.eps, r_max, d_max)


# ----------------------------------------------------------------------------- plain autograd


def autograd_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """``layer(input)`` for a LayerNorm, GroupNorm or BatchRenorm1d, with plain autograd instead
    of the layer's analytic backward: the same forward formulas and state changes, recorded op
    by op. What the analytic backward is measured against (scripts/bench.py) and checked
    against (tests/test_normalizations.py); argument checks are the layers' own.
    """
    if isinstance(layer, LayerNorm):
        check_layer_norm_args(input, layer.normalized_shape, layer.weight, layer.bias)
        rows, weight, bias, d, eps = _layer_norm_rows(input, layer.weight, layer.bias,
                                                      len(layer.normalized_shape), layer.eps)
        return layer_norm_forward_formulas(rows, weight, bias, d, eps)[0].view(input.shape)
    if isinstance(layer, GroupNorm):
        check_group_norm_args(input, layer.num_groups, layer.weight, layer.bias)
        x, m, eps = _group_norm_positions(input, layer.num_groups, layer.eps)
        return group_norm_forward_formulas(x, layer.num_groups, layer.weight, layer.bias, m, eps)[0].view(input.shape)
    if isinstance(layer, BatchRenorm1d):
        layer._check_input_dim(input)
        momentum, r_max, d_max = layer._count_batch()
        weight, bias, training = layer.weight, layer.bias, layer.training
        mean, var = layer.running_mean, layer.running_var
        check_batch_renorm_args(input, mean, var, weight, bias, training, momentum, layer.eps, r_max, d_max)
        return _on_rows(lambda rows: _batch_renorm_rows(rows, weight, bias, mean, var, training, momentum,
                                                        layer.eps, r_max, d_max)[0], input)
    raise TypeError(f"autograd_forward takes a LayerNorm, GroupNorm or BatchRenorm1d, not {type(layer).__name__}")


# ----------------------------------------------------------------------------- speed
# At the harness's 60 x 100 batches a tensor op costs 1-3 us whatever its size, so the cost
# is per call. The one trick kept (bnexp/layers.py's): a Python number in a tensor op is
# wrapped into a new tensor on every call, ~1.5-3 us each here (x + 1e-5 takes 4.5 us, x + t
# with a 0-dim tensor t 1.6 us); the counts and eps are made tensors once. For the same
# reason the means are sum / m rather than .mean() (4.7 us against 2.3 + 1.2 us).


@functools.lru_cache(maxsize=64)
def _constants(m: int, eps: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """m, eps and m / (m - 1) as 0-dim tensors in the input's dtype, made once per set size m.

    Read-only: nothing writes into them. m / (m - 1) is NaN for m = 1 (batch renorm's
    evaluation, the only place m = 1 is allowed, does not use it).
    """
    bessel = m / (m - 1) if m > 1 else float("nan")
    with torch.inference_mode(False):  # usable outside inference mode even if made inside
        return tuple(torch.tensor(v, dtype=dtype, device=device) for v in (m, eps, bessel))


# once_differentiable makes differentiating the gradient an error instead of a silent wrong
# value; its no_grad wrapper is paid only when backward itself is recorded (create_graph=True).
_layer_norm_backward_once = once_differentiable(_layer_norm_backward)
_group_norm_backward_once = once_differentiable(_group_norm_backward)
_batch_renorm_backward_once = once_differentiable(_batch_renorm_backward)
