"""The other normalizations' forward formulas under plain autograd: the reference their
analytic backwards are measured against (scripts/bench.py, norms section) and checked against
(tests/test_normalizations.py). Kept apart from the layers, which do not need it."""

from __future__ import annotations

from torch import Tensor, nn

from bnexp.nn.batch_renorm import BatchRenorm1d, _batch_renorm_rows, _on_rows, check_batch_renorm_args
from bnexp.nn.group_norm import (GroupNorm, _group_norm_positions, check_group_norm_args,
                                 group_norm_forward_formulas)
from bnexp.nn.layer_norm import (LayerNorm, _layer_norm_rows, check_layer_norm_args,
                                 layer_norm_forward_formulas)


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
