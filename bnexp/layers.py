"""Batch normalization written from its formulas: ``batch_norm`` and ``BatchNorm1d``.

Drop-in replacements for ``torch.nn.functional.batch_norm`` and ``torch.nn.BatchNorm1d``
(same signatures, parameter and buffer names, running-statistics rules and error messages),
built from tensor arithmetic only. The training-mode layer is a ``torch.autograd.Function``
with the analytic backward pass, so it saves one centered copy of the input and two
per-channel vectors instead of letting autograd record every intermediate.

The math, per channel c over the n = N (or N * L) values of a batch:

    mean    = sum(x) / n
    var     = sum((x - mean)^2) / n                 # biased: used to normalize
    x_hat   = (x - mean) / sqrt(var + eps)
    y       = weight * x_hat + bias
    running = (1 - momentum) * running + momentum * batch_stat
              (batch_stat is mean, or the UNBIASED var * n / (n - 1))

Backward with g = dy * weight (Ioffe & Szegedy 2015, Sec. 3):

    dx      = inv_std / n * (n * g - sum(g) - x_hat * sum(g * x_hat))
    dweight = sum(dy * x_hat)
    dbias   = sum(dy)

Speed (scripts/bench.py has the numbers): on the CPU each tensor op is one pass over
memory, so the code counts passes. The output is written in one pass as
(x - mean) * (weight * inv_std) + bias, x_hat is never stored, the buffers of the squares
and of dy * (x - mean) become the output and grad_input, large 2-D sums are BLAS
products, and on one thread the products that are only summed are formed row block by
row block so that they stay in cache. At small batches (the harness's 60 x 100) the cost
is per call, ~1-2 us an op: Python floats are never passed to tensor ops (each would be
wrapped and cast), the module reads its parameters without nn.Module.__getattr__, and
small inputs skip the helper functions. torch's own kernel fuses all of this in C++, so
eager code stays 1.6-2x slower at large sizes; ``BatchNorm1d(compile=True)`` fuses the same
formulas into torch's pass count and is as fast as torch's kernel there (bnexp/compiled.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["batch_norm", "BatchNorm1d"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch-normalize ``input`` of shape (N, C, *) per channel C, like ``F.batch_norm``.

    training=True normalizes with the batch statistics and, where running_mean /
    running_var are given, updates them in place with ``momentum`` (the variance
    update uses the unbiased batch variance). training=False normalizes with the
    running statistics, which must then be given.
    """
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """``batch_norm`` after its argument checks (the module checks its own input)."""
    if training:
        return _TrainingBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    if _needs_grad(input, weight, bias):
        return _EvalBatchNorm.apply(input, weight, bias, running_mean, running_var, eps)
    scale, shift = _eval_scale_shift(weight, bias, running_mean, running_var, eps)
    return torch.addcmul(_per_channel(shift, input), input, _per_channel(scale, input))


class _TrainingBatchNorm(torch.autograd.Function):
    """Training mode: batch statistics, in-place running update, analytic backward.

    x_hat = centered * inv_std is never stored: the output is centered * scale + bias with
    scale = weight * inv_std (one pass), and backward works from the centered input.
    Saved for backward: centered (N*C), inv_std and scale (C each), no more than torch
    saves (input, mean, 1/std, weight and both running buffers). Constants such as n and
    eps are cached 0-dim tensors (_batch_constants): 12 ops forward, 10 backward.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        n, n_minus_1, eps_t, inv_n, minus_inv_n = _batch_constants(
            input.numel() // input.shape[1], eps, input.dtype, input.device
        )
        small = _is_small_2d(input)
        if small:
            # the training default: _center's ops without its helper calls (~3 us a call)
            mean = input.sum(0).div_(n)
            centered = input - mean
            output = torch.mul(centered, centered)  # the squares; then the output's buffer
            var_sum = output.sum(0)
        else:
            mean = _channel_sum(input).div_(n)
            # x - mean, sum((x - mean)^2), and a scratch tensor (the squares) to write into
            centered, var_sum, output = _center(input, mean)
        # eps + var_sum * (1/n): one op; 1/n rounds by at most half an ulp (exact for 2^k)
        inv_std = torch.addcmul(eps_t, var_sum, inv_n).rsqrt_()
        scale = inv_std if weight is None else inv_std * weight
        if small and bias is not None:  # (N, C): scale and bias broadcast as they are
            torch.addcmul(bias, centered, scale, out=output)
        else:
            _scale_shift(centered, scale, bias, out=output)
        if running_mean is not None or running_var is not None:
            _update_running(running_mean, running_var, mean, var_sum.div_(n_minus_1), momentum)
        ctx.save_for_backward(centered, inv_std, scale)
        ctx.minus_inv_n = minus_inv_n
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True: the saved tensors are constants to autograd, so a second
            # derivative would be silently wrong; once_differentiable makes it an error.
            # (Applied only here: its wrapper costs ~8 us per call at small batches.)
            return _training_backward_once(ctx, grad_output)
        return _training_backward(ctx, grad_output)


def _training_backward(ctx, grad_output):
    """Gradients of input, weight and bias from the saved centered input (see module doc)."""
    centered, inv_std, scale = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    # sum(dy) and sum(dy * (x - mean)); dweight = sum(dy * x_hat) = inv_std * the latter.
    # scratch: a tensor of the input's size that grad_input may overwrite (one allocation)
    small = _is_small_2d(centered)
    if small:  # _sum_and_dot's ops without its helper calls
        grad_bias = grad_output.sum(0)
        scratch = torch.mul(grad_output, centered)
        grad_centered = scratch.sum(0)
    else:
        grad_bias, grad_centered, scratch = _sum_and_dot(grad_output, centered)
    grad_weight = grad_centered.mul_(inv_std)
    grad_input = None
    if need_input:
        # dx = scale * dy - scale/n * (sum(dy) + x_hat * sum(dy * x_hat)), x_hat = centered * inv_std
        # (_foreach_mul of the two products measured slower than two small muls)
        minus_scale_n = scale * ctx.minus_inv_n
        shift = minus_scale_n * grad_bias
        centered_scale = minus_scale_n.mul_(inv_std).mul_(grad_weight)  # after shift: in place
        if small:  # _scaled_sum's ops without its helper calls
            grad_input = torch.addcmul(shift, centered, centered_scale, out=scratch)
            grad_input.addcmul_(grad_output, scale)
        else:
            grad_input = _scaled_sum(grad_output, scale, centered, centered_scale, shift, out=scratch)
    return (
        grad_input,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None, None, None, None,
    )


_training_backward_once = once_differentiable(_training_backward)


@functools.lru_cache(maxsize=64)
def _batch_constants(n: int, eps: float, dtype: torch.dtype, device: torch.device):
    """0-dim tensors n, n - 1, eps, 1/n and -1/n in the input's dtype, made once per batch size.

    A Python float in a tensor op is wrapped into a double tensor and cast on every call
    (~1.2 us measured here, as long as the small op itself); cached tensors skip that.
    They are read-only operands: nothing writes into them or saves them for backward.
    """
    with torch.inference_mode(False):  # usable outside inference mode even if made inside
        values = (float(n), n - 1.0, eps, 1.0 / n, -1.0 / n)
        return tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)


# BLAS sums: at least this many elements, in blocks of this many rows (see _channel_sum)
_BLAS_SUM_MIN_ELEMENTS = 1 << 16
_BLAS_SUM_ROWS = 128


def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum over every dim but 1 (the channel dim).

    Large contiguous 2-D inputs are summed as a batched matrix-vector product with a vector
    of ones over blocks of 128 rows, then the block sums are added: one multi-threaded BLAS
    read, measured 1.2-1.4x faster than torch.sum over dim 0 here (2 threads). One gemv over
    all rows is faster still, but it accumulates row after row: at 4096 rows its error was
    10x torch.sum's (and above torch's batch norm); 128-row blocks keep it at torch.sum's.
    """
    rows = t.shape[0]
    if (
        t.dim() != 2
        or t.numel() < _BLAS_SUM_MIN_ELEMENTS
        or rows < 2 * _BLAS_SUM_ROWS
        or not t.is_contiguous()
    ):
        return t.sum(_reduce_dims(t))
    blocks, rest = divmod(rows, _BLAS_SUM_ROWS)
    body = t[: rows - rest].view(blocks, _BLAS_SUM_ROWS, t.shape[1])
    total = torch.matmul(_ones(_BLAS_SUM_ROWS, t.dtype, t.device), body).sum(0)
    return total if rest == 0 else total.add_(t[rows - rest :].sum(0))


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A read-only vector of n ones (the BLAS sums' right-hand side), made once."""
    with torch.inference_mode(False):
        return torch.ones(n, dtype=dtype, device=device)


# Row blocks of about 512 KB of float32: an elementwise result that is reduced or updated
# right away stays in the CPU cache instead of making a round trip through memory.
_BLOCK_ELEMENTS = 1 << 17


def _row_blocks(input: Tensor) -> list[slice] | None:
    """Slices of rows for cache blocking, or None where one whole-tensor op is better.

    Only for large 2-D inputs on a single-threaded CPU: elsewhere the per-op overhead of a
    Python loop costs more than the memory traffic it saves. With several threads every
    op is a parallel region, and when another process holds a core each region can wait
    a whole scheduler slice (~50 ms measured here): dozens of block ops would multiply that.
    """
    if (
        input.dim() != 2
        or input.numel() < 4 * _BLOCK_ELEMENTS
        or input.device.type != "cpu"
        or torch.get_num_threads() != 1
    ):
        return None
    rows = max(1, _BLOCK_ELEMENTS // input.shape[1])
    return [slice(start, start + rows) for start in range(0, input.shape[0], rows)]


def _is_small_2d(input: Tensor) -> bool:
    """An (N, C) input too small for BLAS sums or row blocks: plain ops, fewest Python calls."""
    return input.dim() == 2 and input.numel() < _BLAS_SUM_MIN_ELEMENTS


def _center(input: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(input - mean, the per-channel sum of its squares, a free tensor shaped like input).

    The third tensor is where the squares were written (or an empty one): the caller
    writes its output there, saving an allocation of the input's size.
    """
    blocks = _row_blocks(input)
    if blocks is None:
        centered = input - _per_channel(mean, input)
        squares = torch.mul(centered, centered)
        return centered, _channel_sum(squares), squares
    centered = torch.empty_like(input)
    partial = input.new_empty(len(blocks), input.shape[1])
    square = input.new_empty(blocks[0].stop, input.shape[1])
    for i, rows in enumerate(blocks):
        block = torch.sub(input[rows], mean, out=centered[rows])
        torch.sum(torch.mul(block, block, out=square[: block.shape[0]]), 0, out=partial[i])
    return centered, partial.sum(0), torch.empty_like(input)


def _sum_and_dot(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sum(a) and sum(a * b), and a free tensor shaped like b (see _center)."""
    blocks = _row_blocks(a)
    if blocks is None:
        product = torch.mul(a, b)
        return _channel_sum(a), _channel_sum(product), product
    partial = a.new_empty(2, len(blocks), a.shape[1])
    product = a.new_empty(blocks[0].stop, a.shape[1])
    for i, rows in enumerate(blocks):
        block = a[rows]
        torch.sum(block, 0, out=partial[0, i])
        torch.sum(torch.mul(block, b[rows], out=product[: block.shape[0]]), 0, out=partial[1, i])
    sums = partial.sum(1)
    return sums[0], sums[1], torch.empty_like(b)


def _scaled_sum(
    t: Tensor, t_scale: Tensor, u: Tensor, u_scale: Tensor, shift: Tensor, out: Tensor
) -> Tensor:
    """t * t_scale + u * u_scale + shift with per-channel scales, written into ``out``."""
    t_scale, u_scale, shift = (_per_channel(v, t) for v in (t_scale, u_scale, shift))
    blocks = _row_blocks(out)
    if blocks is None:
        return torch.addcmul(shift, u, u_scale, out=out).addcmul_(t, t_scale)
    for rows in blocks:
        torch.addcmul(shift, u[rows], u_scale, out=out[rows]).addcmul_(t[rows], t_scale)
    return out


class _EvalBatchNorm(torch.autograd.Function):
    """Evaluation mode with gradients: running statistics, no update."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps):
        scale, shift = _eval_scale_shift(weight, bias, running_mean, running_var, eps)
        shape = _channel_shape(input)
        inv_std = torch.rsqrt(running_var + eps)
        ctx.save_for_backward(input, running_mean, inv_std, scale)
        return torch.addcmul(shift.view(shape), input, scale.view(shape))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, running_mean, inv_std, scale = ctx.saved_tensors
        dims, shape = _reduce_dims(input), _channel_shape(input)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_output * scale.view(shape) if need_input else None
        grad_weight = None
        if need_weight:
            # sum(dy * (x - mean)) * inv_std: summing first, scaling after, as torch does
            # (scaling every term first measured less accurate); the saved input is
            # centered again here: memory traded for a pass
            centered = input - running_mean.view(shape)
            grad_weight = centered.mul_(grad_output).sum(dims).mul_(inv_std)
        grad_bias = grad_output.sum(dims) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None


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
        compile: in training mode, run the formulas as two loops forward and two backward
            that ``torch.compile`` fuses (:mod:`bnexp.compiled`; keyword only, not part of
            torch's signature; the harness's ``norm.compile``). Inputs of fewer than
            65,536 values (``_MIN_COMPILED_ELEMENTS``) keep the eager path, which is
            faster there. Each new input shape compiles once (seconds on a CPU; needs a C++
            compiler, as torch.compile does). Evaluation mode is one fused op either way.
            Default: ``False``

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

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.use_compile = compile  # not self.compile: that would hide nn.Module.compile()
        like = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **like)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **like)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **like))
            self.register_buffer("running_var", torch.ones(num_features, **like))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
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
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        weight, bias = _read(self, self._parameters, "weight"), _read(self, self._parameters, "bias")
        running_mean = _read(self, self._buffers, "running_mean")
        running_var = _read(self, self._buffers, "running_var")
        factor = self._running_factor()
        use_batch_stats = self.training or running_mean is None
        if self.training and not self.track_running_stats:
            running_mean = running_var = None  # passed only where used or updated
        # parameters and buffers have num_features elements by construction: only the
        # mode-dependent checks remain (they cost microseconds per call at small batches)
        _check_mode(input, running_mean, running_var, use_batch_stats, factor, self.eps)
        if use_batch_stats:
            function = _TrainingBatchNorm
            if self.use_compile and input.numel() >= _MIN_COMPILED_ELEMENTS:
                from bnexp.compiled import CompiledTrainingBatchNorm as function
            return function.apply(input, weight, bias, running_mean, running_var, factor, self.eps)
        return _batch_norm(input, running_mean, running_var, weight, bias, False, factor, self.eps)

    def _check_input(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} features in dim 1 "
                f"(got {input.shape[1]}; input size {tuple(input.shape)})"
            )

    def _running_factor(self) -> float:
        """Count a training batch; return the weight of this batch in the running stats."""
        if self.training and self.track_running_stats:
            tracked = _read(self, self._buffers, "num_batches_tracked")
            if tracked is not None:
                tracked.add_(_one(tracked.device))  # a cached 1: an int would be wrapped each call
                if self.momentum is None:
                    # note: float() of a device tensor is a host sync (torch does the same)
                    return 1.0 / float(tracked)
        return 0.0 if self.momentum is None else self.momentum


# compile=True: inputs with fewer values run eagerly. A compiled call pays tens of microseconds
# of guards and wrappers, more than the whole eager layer at small sizes (scripts/bench.py).
_MIN_COMPILED_ELEMENTS = 1 << 16

_ABSENT = object()


def _read(module: nn.Module, table: dict, name: str):
    """module.<name> from nn.Module's parameter or buffer table.

    Plain ``module.weight`` goes through nn.Module.__getattr__ in Python (~0.45 us a read,
    five reads per call); a name not in the table (a plain attribute such as weight=None,
    or a parametrization's property) is read the ordinary way.
    """
    value = table.get(name, _ABSENT)
    return getattr(module, name) if value is _ABSENT else value


@functools.lru_cache(maxsize=8)
def _one(device: torch.device) -> Tensor:
    """A read-only 0-dim long 1 for counting batches, made once per device."""
    with torch.inference_mode(False):
        return torch.tensor(1, device=device)


def _scale_shift(input: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor) -> Tensor:
    """input * scale + shift with per-channel scale and optional shift, one pass, into out."""
    if shift is None:
        return torch.mul(input, _per_channel(scale, input), out=out)
    return torch.addcmul(_per_channel(shift, input), input, _per_channel(scale, input), out=out)


def _eval_scale_shift(weight, bias, running_mean, running_var, eps):
    """Per-channel (scale, shift) with y = x * scale + shift in evaluation mode.

    One fused pass over the input, as torch's CPU kernel does it.
    """
    scale = torch.add(running_var, eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight)
    if bias is None:
        return scale, running_mean * -scale
    return scale, torch.addcmul(bias, running_mean, scale, value=-1.0)  # bias - mean * scale


def _update_running(running_mean, running_var, mean, unbiased_var, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch_stat, in place, for each given.

    lerp computes it as running + m * (stat - running), or for m >= 0.5 as
    stat - (1 - m) * (stat - running): exact at m = 1, where the cumulative average's first
    batch replaces the initial values. The weight is a cached 0-dim tensor: in the training
    loop two lerp_ calls with it measured 2.6 us against 4.5 us for one _foreach_lerp_ with a
    Python float (which is wrapped on every call); the results are bitwise the same.
    """
    reference = running_mean if running_mean is not None else running_var
    if reference is None:
        return
    weight = _lerp_weight(momentum, reference.dtype, reference.device)
    if running_mean is not None:
        running_mean.lerp_(mean, weight)
    if running_var is not None:
        running_var.lerp_(unbiased_var, weight)


@functools.lru_cache(maxsize=16)  # a fixed momentum hits; momentum=None (1/k) cycles through
def _lerp_weight(momentum: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A read-only 0-dim tensor holding ``momentum``, made once per value, dtype and device."""
    with torch.inference_mode(False):
        return torch.tensor(momentum, dtype=dtype, device=device)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reduce_dims(input: Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1: (0,) for (N, C), (0, 2) for (N, C, L)."""
    return (0,) if input.dim() == 2 else (0, *range(2, input.dim()))


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against the input: (C,) or (C, 1)."""
    return (input.shape[1],) + (1,) * (input.dim() - 2)


def _per_channel(vector: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast against ``like``: as is for (N, C), (C, 1) for (N, C, L)."""
    return vector if like.dim() == 2 else vector.view(_channel_shape(like))


def _values_per_channel(input: Tensor) -> int:
    return input.numel() // input.shape[1]


def _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    """Raise a ValueError/TypeError naming the bad argument, as torch's batch_norm does."""
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects input of shape (N, C, *) (got {input.dim()}D input)"
        )
    channels = input.shape[1]
    for name, vector in (
        ("running_mean", running_mean), ("running_var", running_var),
        ("weight", weight), ("bias", bias),
    ):
        if vector is not None and vector.numel() != channels:
            raise ValueError(
                f"expected {name} with {channels} elements, one per channel of the input "
                f"(got {vector.numel()}; input size {tuple(input.shape)})"
            )
    _check_mode(input, running_mean, running_var, training, momentum, eps)


def _check_mode(input, running_mean, running_var, training, momentum, eps) -> None:
    """The checks that depend on the mode: batch size and eps, running stats in eval."""
    if training:
        if _values_per_channel(input) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {input.size()}"
            )
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if not isinstance(momentum, (int, float)):
            raise TypeError(f"batch_norm momentum must be a float, got {momentum!r}")
    else:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm needs running_mean and running_var when training=False "
                f"(got running_mean={_describe(running_mean)}, running_var={_describe(running_var)})"
            )


def _describe(tensor: Tensor | None) -> str:
    return "None" if tensor is None else f"a tensor of size {tuple(tensor.shape)}"
