"""Group norm written from its formulas: ``group_norm`` and ``GroupNorm``.

Drop-in replacements for ``torch.nn.functional.group_norm`` and ``torch.nn.GroupNorm`` (same
signatures, parameter names, state_dict keys, repr and error messages), built from tensor
arithmetic only. The C channels are split into G groups; per sample and group, the
m = C / G * L values of the group's channels at every position (L = 1 for an (N, C) input)
share one mean and one variance:

    mean    = sum(x) / m
    var     = sum((x - mean)^2) / m             # biased: divide by m
    x_hat   = (x - mean) / sqrt(var + eps)
    y       = weight * x_hat + bias             # one weight and bias per channel

Training and evaluation compute the same thing (no running statistics). Backward, from
dy = dL/dy, for each group's m values (g = weight * dy):

    dbias   = sum(dy)                           # per channel, over the batch and L
    dweight = sum(dy * x_hat)
    dx      = (g - sum(g) / m - x_hat * sum(g * x_hat) / m) / sqrt(var + eps)   # sums over the group

Reading order: ``group_norm_forward_formulas`` and ``group_norm_backward_formulas`` are the
two blocks above; ``GroupNormFunction`` hands them to autograd; ``check_group_norm_args``
raises torch's errors; ``group_norm`` and ``GroupNorm`` are the functional and module front
doors. The set statistics, the cached constants and the plain-autograd baseline
(``autograd_forward``) are shared with layer norm and batch renorm: bnexp/nn/norm_common.py.
Users import the layer from bnexp.layers, which re-exports it: nothing here imports bnexp.layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnexp.nn.norm_common import _as_int, _constants, _set_backward, _set_moments

__all__ = ["group_norm", "GroupNorm", "GroupNormFunction", "group_norm_forward_formulas",
           "group_norm_backward_formulas", "check_group_norm_args"]


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


# once_differentiable makes differentiating the gradient an error instead of a silent wrong
# value; its no_grad wrapper is paid only when backward itself is recorded (create_graph=True).
_group_norm_backward_once = once_differentiable(_group_norm_backward)
