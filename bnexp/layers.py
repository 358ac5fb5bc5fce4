"""Batch normalization written from its formulas: ``batch_norm`` and ``BatchNorm1d``.

Drop-in replacements for ``torch.nn.functional.batch_norm`` and ``torch.nn.BatchNorm1d``
(same signatures, parameter and buffer names, running-statistics rules and error messages),
built from tensor arithmetic only. Per channel c, over the n values of a batch (n = N for
an (N, C) input, N * L for (N, C, L)):

    mean    = sum(x) / n
    var     = sum((x - mean)^2) / n                 # biased: used to normalize
    x_hat   = (x - mean) / sqrt(var + eps)
    y       = weight * x_hat + bias
    running = (1 - momentum) * running + momentum * batch_stat
              (batch_stat is mean, or the UNBIASED var * n / (n - 1))

In evaluation mode the running estimates take the place of mean and var. Backward, from
dy = dL/dy (Ioffe & Szegedy 2015, Sec. 3):

    dbias   = sum(dy)
    dweight = sum(dy * x_hat)
    dx      = weight / sqrt(var + eps) * (dy - (dbias + x_hat * dweight) / n)

The bracket's correction is there because mean and var are computed from x; in evaluation
mode they are constants and dx = weight / sqrt(var + eps) * dy.

Reading order: ``forward_formulas`` and ``backward_formulas`` are the two blocks above;
``BatchNormFunction`` hands them to autograd and updates the running statistics; the
"speed" section holds the two per-call tricks the layer keeps; ``batch_norm`` and
``BatchNorm1d`` are the functional and module front doors. Nothing here imports from
bnexp: bnexp/nn/compiled.py builds a faster path for large inputs on top of this module.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["batch_norm", "BatchNorm1d", "BatchNormFunction", "forward_formulas", "backward_formulas",
           "update_running_stats", "check_batch_norm_args"]


def forward_formulas(x: Tensor, weight: Tensor | None, bias: Tensor | None, n, eps,
                     stats: tuple[Tensor, Tensor] | None = None):
    """The forward formulas for n rows x of shape (n, C): (y, x - mean, 1/sqrt(var + eps), mean, var).

    Training (stats=None) uses the batch's mean and biased variance; evaluation passes the
    running (mean, var) instead. n and eps are numbers or 0-dim tensors holding them.
    """
    if stats is None:  # training: the batch's own statistics
        mean = x.sum(0) / n
        centered = x - mean
        var = (centered * centered).sum(0) / n
    else:  # evaluation: the running estimates
        mean, var = stats
        centered = x - mean
    inv_std = torch.rsqrt(var + eps)
    # y = weight * x_hat + bias with x_hat = centered * inv_std, in one pass over the values
    # (addcmul(b, t, s) is b + t * s): x_hat is never stored, which saves a share of a training
    # step against writing the formula op by op (docs/results/measurements.md#batch-norm-layer-speed)
    scale = inv_std if weight is None else weight * inv_std
    y = centered * scale if bias is None else torch.addcmul(bias, centered, scale)
    return y, centered, inv_std, mean, var


def backward_formulas(dy: Tensor, centered: Tensor, inv_std: Tensor, weight: Tensor | None, n,
                      training: bool):
    """The backward formulas: (dx, dweight, dbias) from dy and what forward_formulas returned."""
    x_hat = centered * inv_std
    dbias = dy.sum(0)
    dweight = (dy * x_hat).sum(0)
    if training:  # mean and var are computed from x: take out their share of dy
        dy = dy - (dbias + x_hat * dweight) / n
    dx = dy * (inv_std if weight is None else weight * inv_std)
    return dx, dweight, dbias


class BatchNormFunction(torch.autograd.Function):
    """Batch norm of (n, C) rows with the analytic backward; updates the running stats in forward.

    Saved for backward: x - mean (n * C values), 1/std and the weight (C each), less than
    torch saves. Autograd would instead record every intermediate of forward_formulas.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        n, eps, bessel = _constants(x.shape[0], eps, x.dtype, x.device)
        stats = None if training else (running_mean, running_var)
        y, centered, inv_std, mean, var = forward_formulas(x, weight, bias, n, eps, stats)
        if training:  # the running variance averages the unbiased var * n / (n - 1)
            update_running_stats(running_mean, running_var, mean, var * bessel, momentum)
        ctx.save_for_backward(centered, inv_std, weight)
        ctx.n, ctx.training = n, training
        return y

    @staticmethod
    def backward(ctx, dy):
        return (_backward_once if torch.is_grad_enabled() else _backward)(ctx, dy)


def _backward(ctx, dy):
    """BatchNormFunction's backward: the formulas, and None for what needs no gradient."""
    centered, inv_std, weight = ctx.saved_tensors
    dx, dweight, dbias = backward_formulas(dy, centered, inv_std, weight, ctx.n, ctx.training)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (dx if need_x else None, dweight if need_weight else None,
            dbias if need_bias else None, None, None, None, None, None)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None,
                         mean: Tensor, unbiased_var: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch_stat, in place, for each one given.

    lerp is that formula; it is exact at momentum 1, where the cumulative average
    (momentum=None) replaces the initial values with the first batch's.
    """
    if running_mean is not None:
        running_mean.lerp_(mean, momentum)
    if running_var is not None:
        running_var.lerp_(unbiased_var, momentum)


# ----------------------------------------------------------------------------- speed
# The harness normalizes batches of 60 x 100, where a tensor op takes microseconds whatever
# its size (docs/results/measurements.md#batch-norm-layer-speed): the layer's cost is per call, not per value. The two tricks below earn their place
# there; each gain is the share of a training step of the default MLP (3 layers) that it
# saves, in instructions counted with valgrind's callgrind (which load from other processes
# does not disturb). Large inputs are the job of CompiledBatchNorm1d (bnexp/nn/compiled.py).


@functools.lru_cache(maxsize=64)
def _constants(n: int, eps: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """n, eps and n / (n - 1) as 0-dim tensors in the input's dtype, made once per batch size.

    A Python number in a tensor op is wrapped into a new tensor on every call (as long as a
    small op itself); those conversions cost a share of a training step
    (docs/results/measurements.md#batch-norm-layer-speed). The
    tensors are read-only: nothing writes into them. n / (n - 1) is NaN for n = 1, where
    only evaluation is allowed (and does not use it).
    """
    bessel = n / (n - 1) if n > 1 else float("nan")
    with torch.inference_mode(False):  # usable outside inference mode even if made inside
        return tuple(torch.tensor(v, dtype=dtype, device=device) for v in (n, eps, bessel))


# once_differentiable makes differentiating the gradient an error instead of a silent wrong
# value (the saved tensors are constants to autograd). Its wrapper (a no_grad block around
# the call) costs a share of a training step (docs/results/measurements.md#batch-norm-layer-speed), and it is needed only when backward itself is
# recorded (create_graph=True): BatchNormFunction.backward uses it only then.
_backward_once = once_differentiable(_backward)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch-normalize ``input`` of shape (N, C, *) per channel C, like ``F.batch_norm``.

    training=True normalizes with the batch statistics and, where running_mean /
    running_var are given, updates them in place with ``momentum`` (the variance
    update uses the unbiased batch variance). training=False normalizes with the
    running statistics, which must then be given.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() == 2:
        return BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                       training, momentum, eps)
    # (N, C, L, ...): the same as N * L * ... rows of C channels (a copy each way)
    channels_last = input.movedim(1, -1)
    rows = channels_last.reshape(-1, input.shape[1])
    y = BatchNormFunction.apply(rows, weight, bias, running_mean, running_var, training, momentum, eps)
    return y.view(channels_last.shape).movedim(-1, 1).contiguous()


class BatchNorm1d(nn.Module):
    r"""Batch normalization over a 2D (N, C) or 3D (N, C, L) input, written from the formulas.

    A drop-in for ``torch.nn.BatchNorm1d`` (Ioffe & Szegedy 2015,
    https://arxiv.org/abs/1502.03167): same arguments, the same parameters and buffers
    under the same names, so a ``state_dict`` loads strictly into either class.

    In training mode each channel c is normalized with the statistics of the batch,
    taken over the n = N (or N * L) values of that channel:

    .. math::

        \mu_c = \frac{1}{n} \sum_j x_{jc} \qquad
        \sigma^2_c = \frac{1}{n} \sum_j (x_{jc} - \mu_c)^2

        \hat{x}_{jc} = \frac{x_{jc} - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \qquad
        y_{jc} = \gamma_c \hat{x}_{jc} + \beta_c

    and the running estimates used later in evaluation mode are updated in place:

    .. math::

        \hat{\mu} \leftarrow (1 - m)\,\hat{\mu} + m\,\mu_c \qquad
        \hat{\sigma}^2 \leftarrow (1 - m)\,\hat{\sigma}^2 + m\,\frac{n}{n - 1}\,\sigma^2_c

    The subtlety: the output is normalized with the *biased* variance :math:`\sigma^2_c`
    (divide by n, ``torch.var(x, correction=0)``), while the running variance averages the
    *unbiased* one (divide by n - 1, ``correction=1``), the estimate of the population
    variance that evaluation uses (Ioffe & Szegedy, Algorithm 2). ``num_batches_tracked``
    counts training forward passes; with ``momentum=None`` the factor m is
    ``1 / num_batches_tracked``, a cumulative average in which the first batch replaces the
    initial zeros and ones entirely.

    Choosing :math:`\gamma = \sqrt{\sigma^2 + \epsilon}` and :math:`\beta = \mu` makes the
    layer the identity, so normalizing loses nothing the network cannot undo.

    In evaluation mode the running estimates replace the batch statistics and nothing is
    updated; with ``track_running_stats=False`` there are none and batch statistics are
    used in both modes.

    Args:
        num_features: number of features or channels C of the input
        eps: added to the variance before the square root, for numerical stability.
            Default: 1e-5
        momentum: weight m of the newest batch in the running estimates; ``None`` for a
            cumulative (simple) average. Default: 0.1
        affine: learnable per-channel scale ``weight`` (init 1) and shift ``bias``
            (init 0). Default: ``True``
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``; when ``False`` they are ``None``. Default: ``True``
        device, dtype: where and in which precision parameters and buffers are made
        bias: with ``affine``, also learn the shift (keyword only, as in torch).
            Default: ``True``

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: same shape as the input

    Gradients: first derivatives for input, weight and bias (gradcheck-tested). Second
    derivatives are not implemented; differentiating a gradient raises torch's
    ``once_differentiable`` RuntimeError rather than returning a wrong value.

    Example::

        >>> m = BatchNorm1d(100)
        >>> x = torch.randn(20, 100) * 3 + 5
        >>> y = m(x)  # training mode: each column of y has mean 0, variance ~1
        >>> m.eval()
        >>> y = m(x)  # evaluation mode: uses m.running_mean and m.running_var
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        like = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **like)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **like)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **like))
            self.register_buffer("running_var", torch.ones(num_features, **like))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
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

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} features in dim 1 "
                             f"(got {input.shape[1]}; input size {tuple(input.shape)})")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        # torch's rules: count every training batch; momentum=None averages all batches so far
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(tracked)  # note: a host sync on a GPU, as in torch
        # batch statistics in training, and in evaluation when there are no running ones
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None  # passed only where they are read or updated
        return self._batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch_stats, momentum, self.eps)

    # the function forward ends in; CompiledBatchNorm1d (bnexp/nn/compiled.py) swaps in its own
    _batch_norm = staticmethod(batch_norm)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    """Raise a ValueError/TypeError naming the bad argument of batch_norm, as torch's does."""
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, *) (got {input.dim()}D input)")
    channels = input.shape[1]
    for name, vector in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        if vector is not None and vector.numel() != channels:
            raise ValueError(f"expected {name} with {channels} elements, one per channel of the input "
                             f"(got {vector.numel()}; input size {tuple(input.shape)})")
    if training:
        if input.numel() // channels == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if not isinstance(momentum, (int, float)):
            raise TypeError(f"batch_norm momentum must be a float, got {momentum!r}")
    else:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm needs running_mean and running_var when training=False "
                             f"(got running_mean={_describe(running_mean)}, "
                             f"running_var={_describe(running_var)})")


def _describe(tensor: Tensor | None) -> str:
    return "None" if tensor is None else f"a tensor of size {tuple(tensor.shape)}"


# users import every layer from bnexp.layers: the other normalizations live in their own modules
from bnexp.nn.layer_norm import LayerNorm, layer_norm  # noqa: E402,F401
from bnexp.nn.group_norm import GroupNorm, group_norm  # noqa: E402,F401
from bnexp.nn.batch_renorm import BatchRenorm1d, batch_renorm  # noqa: E402,F401
