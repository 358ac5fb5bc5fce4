"""Layer norm written from its formulas: ``layer_norm`` and ``LayerNorm``.

Drop-in replacements for ``torch.nn.functional.layer_norm`` and ``torch.nn.LayerNorm`` (same
signatures, parameter names, state_dict keys, repr and error messages), built from tensor
arithmetic only. Each sample's last D values (D = prod(normalized_shape)) share one mean and
one variance:

    mean    = sum(x) / D
    var     = sum((x - mean)^2) / D             # biased: divide by D
    x_hat   = (x - mean) / sqrt(var + eps)
    y       = weight * x_hat + bias             # one weight and bias per element of normalized_shape

Training and evaluation compute the same thing (no running statistics). Backward, from
dy = dL/dy, for each row of D values (g = weight * dy):

    dbias   = sum(dy)                           # over the rows (every leading dim)
    dweight = sum(dy * x_hat)
    dx      = (g - sum(g) / D - x_hat * sum(g * x_hat) / D) / sqrt(var + eps)   # sums over the row

Reading order: ``layer_norm_forward_formulas`` and ``layer_norm_backward_formulas`` are the
two blocks above; ``LayerNormFunction`` hands them to autograd; ``check_layer_norm_args``
raises torch's errors; ``layer_norm`` and ``LayerNorm`` are the functional and module front
doors. The set statistics, the cached constants and the plain-autograd baseline
(``autograd_forward``) are shared with group norm and batch renorm: bnexp/nn/norm_common.py.
Users import the layer from bnexp.layers, which re-exports it: nothing here imports bnexp.layers.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnexp.nn.norm_common import _as_int, _constants, _set_backward, _set_moments

__all__ = ["layer_norm", "LayerNorm", "LayerNormFunction", "layer_norm_forward_formulas",
           "layer_norm_backward_formulas", "check_layer_norm_args"]


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


# once_differentiable makes differentiating the gradient an error instead of a silent wrong
# value; its no_grad wrapper is paid only when backward itself is recorded (create_graph=True).
_layer_norm_backward_once = once_differentiable(_layer_norm_backward)
