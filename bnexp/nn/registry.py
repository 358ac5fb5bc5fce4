"""The norm registry: every normalization a run can use, each in one entry.

An entry says everything the rest of bnexp needs to know about a variant: how to build its
layer for one run (`make`), how to build the same layer for K stacked members (`stack`, used
by bnexp/nn/stacked.py; None if it has no stacked form), whether it keeps running statistics
(TensorBoard logs them), what `norm.compile=true` does to it, and how reports draw it (label,
colour, line, marker; its place in tables and legends is its place in `NORMS`).

Adding a normalization is its layer code plus one entry here (plus `conf/norm/<name>.yaml`,
so that Hydra offers `norm=<name>`, and its tests). The model, the loop, the launcher, the
statistics, the figures and the HParams domains all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class NormVariant:
    """One value of the `norm` config group."""

    name: str
    label: str  # in tables and legends
    color: str  # matplotlib colour, the same in every figure
    line: str  # matplotlib line style
    marker: str
    make: Callable[..., nn.Module]  # (num_features, norm_cfg) -> the layer after a hidden Linear
    stack: Callable[..., nn.Module] | None  # (members, num_features, norm_cfg) -> the K-member layer
    running_stats: bool  # keeps running_mean / running_var buffers
    batch_stats: bool  # normalizes by batch statistics in training: needs train.batch_size >= 2
    compile: str = "ignored"  # norm.compile=true: "fused" (a compiled form), "ignored" (nothing to compile), "refused"
    takes_noise: bool = False  # reads norm.noise_* (bnexp/nn/noise.py)
    capturable: bool = True  # its training step can be captured as a CUDA graph (bnexp/run/graphs.py)
    capture_note: str = ""  # why not, in the log line of a run on a GPU


def _identity(*_args) -> nn.Module:
    return nn.Identity()


def _custom(num_features: int, cfg) -> nn.Module:
    from bnexp.nn.compiled import CompiledBatchNorm1d
    from bnexp.layers import BatchNorm1d

    return CompiledBatchNorm1d(num_features) if cfg.compile else BatchNorm1d(num_features)


def _native(num_features: int, cfg) -> nn.Module:
    return nn.BatchNorm1d(num_features)


def _noise_args(cfg) -> dict:
    return {"shift": cfg.noise_shift, "scale": cfg.noise_scale, "jitter": cfg.noise_jitter}


def _custom_noisy(num_features: int, cfg) -> nn.Module:
    from bnexp.nn.noise import NoisyBatchNorm1d

    return NoisyBatchNorm1d(num_features, **_noise_args(cfg))


def _layer(num_features: int, cfg) -> nn.Module:
    from bnexp.layers import LayerNorm

    return LayerNorm(num_features)


def _group(num_features: int, cfg) -> nn.Module:
    from bnexp.layers import GroupNorm

    return GroupNorm(cfg.groups, num_features)


def _renorm_args(cfg) -> dict:
    return {"r_max": cfg.r_max, "d_max": cfg.d_max, "hold_steps": cfg.hold_steps, "warmup_steps": cfg.warmup_steps}


def _batch_renorm(num_features: int, cfg) -> nn.Module:
    from bnexp.layers import BatchRenorm1d

    return BatchRenorm1d(num_features, **_renorm_args(cfg))


def _stacked_layer(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    return stacked.StackedLayerNorm(members, num_features)


def _stacked_group(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    return stacked.StackedGroupNorm(members, num_features, cfg.groups)


def _stacked_renorm(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    return stacked.StackedBatchRenorm1d(members * num_features, **_renorm_args(cfg))


def _stacked_custom(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    cls = stacked.StackedCompiledBatchNorm1d if cfg.compile else stacked.StackedBatchNorm1d
    return cls(members * num_features)


def _stacked_native(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    return stacked.StackedTorchBatchNorm1d(members * num_features)


def _stacked_noisy(members: int, num_features: int, cfg) -> nn.Module:
    from bnexp.nn import stacked

    return stacked.StackedNoisyBatchNorm1d(members, num_features, **_noise_args(cfg))


# In display order: the baseline first, then our layer, the reference, and the controls.
NORMS: dict[str, NormVariant] = {v.name: v for v in (
    NormVariant("none", "none", "tab:red", "-", "o", _identity, _identity, running_stats=False,
                batch_stats=False),
    # custom and native should overlap exactly: different dashes and markers keep both visible
    NormVariant("custom", "custom", "tab:blue", "-", "o", _custom, _stacked_custom, running_stats=True,
                batch_stats=True, compile="fused"),
    NormVariant("native", "native", "tab:green", "--", "s", _native, _stacked_native, running_stats=True,
                batch_stats=True),
    NormVariant("custom_noisy", "custom_noisy", "tab:purple", "-.", "^", _custom_noisy, _stacked_noisy,
                running_stats=True, batch_stats=True, takes_noise=True, compile="refused", capturable=False,
                capture_note="it draws its noise from its own generators, which a graph would replay unchanged"),
    # the controls that normalize by the sample (Ba et al. 2016; Wu & He 2018) or by the batch
    # corrected toward the running statistics (Ioffe 2017): bnexp/layers.py re-exports them
    NormVariant("layer", "layer", "tab:orange", ":", "D", _layer, _stacked_layer, running_stats=False,
                batch_stats=False),
    NormVariant("group", "group", "tab:brown", ":", "v", _group, _stacked_group, running_stats=False,
                batch_stats=False),
    NormVariant("batch_renorm", "batch_renorm", "tab:cyan", "-.", "P", _batch_renorm, _stacked_renorm,
                running_stats=True, batch_stats=True, capturable=False,
                capture_note="its r_max/d_max schedule reads the batch count on the host each step"),
)}


def variant(name: str) -> NormVariant:
    """The registry entry of `name`; ValueError naming the known ones otherwise."""
    if name not in NORMS:
        raise ValueError(f"norm={name!r} is not known: one of {', '.join(NORMS)}")
    return NORMS[name]


def order(name: str) -> tuple[int, str]:
    """Sort key: registry order, unknown names (old run dirs) after, by name."""
    names = list(NORMS)
    return (names.index(name) if name in names else len(names), name)


def stacked_model(members: int, template: nn.Module, norm_cfg) -> nn.Module:
    """The StackedMLP of `members` copies of the solo MLP `template`, each hidden layer's norm
    stacked as norm_cfg's entry says (bnexp/nn/stacked.py)."""
    from bnexp.nn.stacked import StackedMLP

    stack = variant(norm_cfg.name).stack
    if stack is None:
        raise ValueError(f"norm={norm_cfg.name} has no stacked form: its runs train alone")
    return StackedMLP(members, template, lambda k, width: stack(k, width, norm_cfg))
