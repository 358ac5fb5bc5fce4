"""``CompiledBatchNorm1d``: the layer's training formulas fused by torch.compile, for large inputs.

Eager tensor code pays one pass over memory per op: the eager layer (bnexp/layers.py), written
op by op, makes about 25 passes where torch's C++ kernel makes five or six (an earlier eager
layer that fused and reused all it could still ran 1.6-2x slower than torch's at large
shapes). Here the same formulas are two plain functions, one forward and one backward, that
``torch.compile`` turns into a few fused loops each (on the CPU: C++ with OpenMP, generated
by inductor and built by the system's C++ compiler):

    forward:  a read of x for the mean, one for the variance, one to write y
    backward: one read of dy and x for sum(dy) and sum(dy * x_hat), one to write dx

the pass count of torch's own CPU kernel. They run inside a ``torch.autograd.Function``
rather than being differentiated by autograd, so what is saved for backward is x, the mean
and 1/std, as torch saves them.

Costs: compiling takes seconds for each new input shape (its first call), and each compiled
call pays tens of microseconds of guards and wrappers, more than the whole eager layer at
small sizes: inputs of fewer than ``MIN_ELEMENTS`` values take the eager layer, and so does
evaluation mode. The running statistics are updated eagerly, so a changing momentum
(``momentum=None``) never recompiles. ``reset()`` forgets what was compiled.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnexp.layers import BatchNorm1d, batch_norm, check_batch_norm_args, update_running_stats

__all__ = ["CompiledBatchNorm1d", "compiled_batch_norm", "MIN_ELEMENTS", "reset", "compiled_formulas",
           "compile_error", "forward_formulas", "backward_formulas", "channel_sum"]

# Smaller inputs run eagerly: a compiled call's tens of microseconds of guards and wrappers
# cost more than the whole eager layer there (scripts/bench.py, layer section).
MIN_ELEMENTS = 1 << 16


def compiled_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``bnexp.layers.batch_norm``, with training-mode inputs of >= MIN_ELEMENTS values compiled."""
    if not training or input.numel() < MIN_ELEMENTS:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return CompiledTrainingBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)


class CompiledBatchNorm1d(BatchNorm1d):
    """``BatchNorm1d`` whose training mode runs through torch.compile for inputs of >= 65,536 values.

    Same arguments, parameters, buffers and state_dict as ``BatchNorm1d`` (and so as
    ``torch.nn.BatchNorm1d``); the harness's ``norm.compile=true``. Each new input shape
    compiles once (seconds on a CPU; needs a C++ compiler, as torch.compile does; without
    one it warns once and runs the same formulas eagerly).
    """

    _batch_norm = staticmethod(compiled_batch_norm)


def forward_formulas(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Training-mode forward: (output, mean, 1/std, unbiased variance) over every dim but 1.

    Two passes for the statistics (the mean, then the squares of x - mean), as torch's CPU
    kernel does for (N, C) inputs. Welford's one pass (torch.var_mean) compiled into a loop
    that was slower here and rounded about 3x worse than torch's kernel at 4096 rows.
    """
    shape, n = _channel_shape(input), input.numel() // input.shape[1]
    mean = channel_sum(input) / n
    centered = input - mean.view(shape)  # fused into the loops below, never stored
    var = channel_sum(centered * centered) / n  # biased: normalizes the batch
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else inv_std * weight
    output = centered * scale.view(shape)
    if bias is not None:
        output = output + bias.view(shape)
    return output, mean, inv_std, var * (n / (n - 1))  # unbiased: feeds the running variance


def backward_formulas(grad_output: Tensor, input: Tensor, mean: Tensor, inv_std: Tensor,
                      weight: Tensor | None):
    """(grad_input, grad_weight, grad_bias) from the saved input, mean and 1/std.

    dx = weight * inv_std * (dy - (sum(dy) + x_hat * sum(dy * x_hat)) / n)
    """
    shape, n = _channel_shape(input), input.numel() // input.shape[1]
    x_hat = (input - mean.view(shape)) * inv_std.view(shape)
    grad_bias = channel_sum(grad_output)
    grad_weight = channel_sum(grad_output * x_hat)
    scale = inv_std if weight is None else inv_std * weight
    correction = (grad_bias.view(shape) + x_hat * grad_weight.view(shape)) / n
    grad_input = scale.view(shape) * (grad_output - correction)
    return grad_input, grad_weight, grad_bias


# Rows per block in channel_sum: 16 rows of 1024 float32 channels are 64 KB, well inside a
# core's L2 cache, so every 64-byte column strip of the block is read from cache.
BLOCK_ROWS = 16


def channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum over every dim but 1, written so that inductor's loops read memory well.

    A plain t.sum(0) of an (N, C) tensor compiles (CPU, torch 2.14) to a loop per strip of 16
    channels that walks all N rows, one 64-byte read per 4 KB row: every read a new page, out
    of reach of the prefetcher; with 4096 rows the fused backward took 2x torch's time. Summing
    blocks of BLOCK_ROWS rows first and then the block sums keeps each block in cache; it
    measured faster than torch's kernel, and, being a two-level sum, it rounds less than one
    running sum over all rows. (N, C, L) inputs have contiguous rows of L: a plain sum.
    """
    if t.dim() != 2:
        return t.sum((0, *range(2, t.dim())))
    rows, channels = t.shape
    body = rows - rows % BLOCK_ROWS
    total = t[:body].reshape(body // BLOCK_ROWS, BLOCK_ROWS, channels).sum(1).sum(0)
    return total if body == rows else total + t[body:].sum(0)


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against the input: (C,) or (C, 1)."""
    return (input.shape[1],) + (1,) * (input.dim() - 2)


class CompiledTrainingBatchNorm(torch.autograd.Function):
    """Training mode through the compiled formulas; running statistics updated eagerly.

    Saves x, mean and 1/std (and the weight), as torch's kernel does; double backward
    raises torch's ``once_differentiable`` error.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        output, mean, inv_std, unbiased_var = _run(forward_formulas, input, weight, bias, eps)
        update_running_stats(running_mean, running_var, mean, unbiased_var, momentum)
        ctx.save_for_backward(input, mean, inv_std, weight)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, mean, inv_std, weight = ctx.saved_tensors
        grads = _run(backward_formulas, grad_output, input, mean, inv_std, weight)
        need = ctx.needs_input_grad[:3]
        return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None, None, None)


# ----------------------------------------------------------------------------- the compile cache

_compiled: dict = {}  # formulas -> torch.compile(formulas), shared by every layer in the process
_compile_error: str | None = None  # why torch.compile failed in this process, once it has


def reset() -> None:
    """Forget every compiled function (torch's and ours) and any compile failure.

    The next large training call compiles afresh, as in a new process: for benchmarks
    that time each shape's own static kernels, and for tests that compile themselves.
    """
    global _compile_error
    import torch._dynamo  # torch's own compile caches

    torch._dynamo.reset()
    _compiled.clear()
    _compile_error = None


def compiled_formulas() -> list[str]:
    """Names of the formulas compiled so far in this process (reset() empties it)."""
    return [formulas.__name__ for formulas in _compiled]


def compile_error() -> str | None:
    """Why torch.compile failed in this process (the formulas then run eagerly), or None."""
    return _compile_error


def _run(formulas, *args):
    """formulas(*args) through torch.compile; eagerly, with one warning, if compiling fails.

    torch.compile needs a working C++ compiler (CPU) or Triton (CUDA); without one the same
    formulas still give the right numbers, only without the fusion.
    """
    global _compile_error
    if _compile_error is None:
        try:
            if formulas not in _compiled:
                # dynamic=None: each new shape first compiles static kernels; a second batch
                # size makes torch compile one dynamic-shape kernel instead of one per size
                _compiled[formulas] = torch.compile(formulas, dynamic=None)
            return _compiled[formulas](*args)
        except Exception as error:
            if not _is_compile_failure(error):
                raise
            _compile_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            warnings.warn(f"CompiledBatchNorm1d: torch.compile failed, running the formulas "
                          f"eagerly instead ({_compile_error})", RuntimeWarning, stacklevel=2)
    return formulas(*args)


def _is_compile_failure(error: Exception) -> bool:
    """Whether torch.compile itself failed (no compiler, a backend error), not the formulas."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(error, (TorchDynamoException, InductorError))
