"""What layer norm, group norm and batch renorm share: set statistics, an argument check, cached
constants and ``autograd_forward``, the plain-autograd baseline.

Layer norm (a row of D values) and group norm (a group's C / G channels times L positions)
normalize sets of m values with the same formulas, written once here:

    mean    = sum(x) / m
    var     = sum((x - mean)^2) / m             # biased: divide by m
    x_hat   = (x - mean) / sqrt(var + eps)      # _set_moments
    dx      = (g - sum(g) / m - x_hat * sum(g * x_hat) / m) / sqrt(var + eps)   # _set_backward
              (g = weight * dy, the sums over the set)

Also here: ``_as_int``, torch's reading of an int argument (for the layers' argument checks),
and the "speed" section, the one per-call trick kept (``_constants``).

The layers are in bnexp/nn/layer_norm.py, group_norm.py and batch_renorm.py, which import
this module; users import them from bnexp.layers, which re-exports them. This module imports
torch only. Their plain-autograd reference (the analytic backwards are kept because they are
faster: scripts/bench.py --sections norms prints both) is bnexp/nn/norm_autograd.py.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor


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

def _as_int(value) -> int | None:
    """value as an int where torch's argument parser takes it as one (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # ints, numpy ints, one-element integer tensors
    except TypeError:
        return None


# ----------------------------------------------------------------------------- plain autograd


# ----------------------------------------------------------------------------- speed
# At the harness's 60 x 100 batches a tensor op costs microseconds whatever its size, so the
# cost is per call. The one trick kept (bnexp/layers.py's): a Python number in a tensor op is
# wrapped into a new tensor on every call; the counts and eps are made tensors once. For the
# same reason the means are sum / m rather than .mean() (the figures:
# docs/results/measurements.md#batch-norm-layer-speed).


@functools.lru_cache(maxsize=64)
def _constants(m: int, eps: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """m, eps and m / (m - 1) as 0-dim tensors in the input's dtype, made once per set size m.

    Read-only: nothing writes into them. m / (m - 1) is NaN for m = 1 (batch renorm's
    evaluation, the only place m = 1 is allowed, does not use it).
    """
    bessel = m / (m - 1) if m > 1 else float("nan")
    with torch.inference_mode(False):  # usable outside inference mode even if made inside
        return tuple(torch.tensor(v, dtype=dtype, device=device) for v in (m, eps, bessel))
