"""Batch renormalization (Ioffe 2017) written from its formulas: ``batch_renorm`` and ``BatchRenorm1d``.

Torch has no batch renorm; these take ``F.batch_norm``'s arguments and have
``BatchNorm1d``'s parameters and buffers, built from tensor arithmetic only. In training,
per channel over the n values of the batch (n = N for an (N, C) input, N * L for (N, C, L)),
with the running estimates from before this batch:

    mean    = sum(x) / n
    var     = sum((x - mean)^2) / n             # biased: used to normalize
    sigma_B = sqrt(var + eps)                   sigma = sqrt(running_var + eps)
    r       = clip(sigma_B / sigma, 1 / r_max, r_max)
    d       = clip((mean - running_mean) / sigma, -d_max, d_max)
    x_hat   = (x - mean) / sigma_B
    y       = weight * (x_hat * r + d) + bias
    running = (1 - momentum) * running + momentum * batch_stat
              (batch_stat is mean, or the UNBIASED var * n / (n - 1); after r and d)

r_max = 1, d_max = 0 force r = 1, d = 0: batch norm. Evaluation is batch norm's,
y = weight * (x - running_mean) / sigma + bias. Backward, from dy = dL/dy, with r and d
held constant (no gradient flows through them, as in the paper):

    dbias   = sum(dy)
    dweight = r * sum(dy * x_hat) + d * dbias
    dx      = weight * r / sigma_B * (dy - (dbias + x_hat * sum(dy * x_hat)) / n)

Reading order: ``renorm_limits`` is the schedule of r_max and d_max over training;
``batch_renorm_forward_formulas`` and ``batch_renorm_backward_formulas`` are the blocks
above; ``BatchRenormFunction`` hands them to autograd and updates the running statistics;
``batch_renorm`` and ``BatchRenorm1d`` (whose docstring has the formulas in full) are the
functional and module front doors. The cached constants and the plain-autograd baseline
(``autograd_forward``) are shared with layer and group norm: bnexp/nn/norm_common.py.
Users import the layer from bnexp.layers, which re-exports it: nothing here imports bnexp.layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnexp.nn.norm_common import _constants

__all__ = ["batch_renorm", "BatchRenorm1d", "BatchRenormFunction", "batch_renorm_forward_formulas",
           "batch_renorm_backward_formulas", "check_batch_renorm_args", "renorm_limits"]


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


# once_differentiable makes differentiating the gradient an error instead of a silent wrong
# value; its no_grad wrapper is paid only when backward itself is recorded (create_graph=True).
_batch_renorm_backward_once = once_differentiable(_batch_renorm_backward)
