"""Batch norm followed by shifting noise: Santurkar et al. 2018's control for "internal covariate shift".

Santurkar et al. (2018, §2.1, Fig. 2) train a network whose BN outputs are perturbed by noise
with a non-zero mean and a non-unit variance, drawn afresh at every step, so that each layer's
input distribution keeps moving. If batch norm helped by holding those distributions still
(Ioffe & Szegedy 2015), the noisy network should lose BN's advantage.

The noise here, for one BN layer with output y[j, i] (sample j, unit i), at every training
forward pass (one per training step):

    per unit i, the step's distribution:   s[i] = exp(U(-ln S, ln S))    (scale, log-uniform in [1/S, S])
                                           m[i] ~ U(-M, M)               (shift)
    per sample j and unit i:               a[j, i] = s[i] * (1 + J * e1[j, i])
                                           b[j, i] = m[i] + J * e2[j, i]        e1, e2 ~ N(0, 1)
    output:                                y'[j, i] = a[j, i] * y[j, i] + b[j, i]

with M = norm.noise_shift, S = norm.noise_scale, J = norm.noise_jitter (conf/norm/custom_noisy.yaml).
So the noise of each activation is i.i.d. over the samples of a batch, with mean s[i] * y + m[i]
and variance J^2 (s[i]^2 y^2 + 1), and that mean and variance change at every step. In eval mode
there is no noise (as with dropout). Santurkar et al. describe their noise only in these words
(i.i.d. per activation and sample, non-zero mean, non-unit variance, changing each step); the
two-level form and the values above are this project's choice.

Random numbers come from the layer's own generator (seeded from the run's seed by `seed_noise`,
so no other random stream moves) and are drawn on the CPU whatever the device, so CPU and GPU
runs see the same noise; its state is the module's `_extra_state` in `state_dict`, so
checkpoints carry it and a resumed run draws the same noise as an uninterrupted one.
Cost: 2 * C uniform and 2 * N * C normal draws per layer and step, plus a host-to-device copy
on a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bnexp.layers import BatchNorm1d

NOISE_SEED = 0x4015E  # xor'ed with the run's seed, then + the layer's index: streams of their own


class NoisyBatchNorm1d(BatchNorm1d):
    """bnexp.layers.BatchNorm1d, then per-unit shift and scale noise that changes every step (training only).

    Args:
        num_features: units C
        shift: M, the step's shift mean ~ U(-M, M) per unit
        scale: S >= 1, the step's scale ~ log-uniform in [1/S, S] per unit
        jitter: J, per-sample std around those (relative for the scale, absolute for the shift)

    Running statistics, parameters and buffers are the BN layer's own: the noise is applied to
    its output, so the running statistics describe the clean pre-noise inputs as in plain BN.
    """

    def __init__(self, num_features: int, shift: float = 1.0, scale: float = 2.0, jitter: float = 0.1):
        super().__init__(num_features)
        if shift < 0 or scale < 1 or jitter < 0:
            raise ValueError(f"noise needs shift >= 0, scale >= 1, jitter >= 0 (got {shift}, {scale}, {jitter})")
        self.shift, self.scale, self.jitter = shift, scale, jitter
        self.generator = torch.Generator().manual_seed(NOISE_SEED)

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        if not self.training:
            return output
        a, b = self.draw(output.shape)
        return torch.addcmul(b.to(output.device, output.dtype), output, a.to(output.device, output.dtype))

    def draw(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """One step's multiplicative and additive noise (a, b) of `shape`, from the layer's generator."""
        return draw_noise(self.generator, shape, self.shift, self.scale, self.jitter)

    def get_extra_state(self) -> Tensor:
        """The generator's state (a uint8 tensor: plain data, loadable with weights_only)."""
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}, scale={self.scale}, jitter={self.jitter}"


def draw_noise(generator: torch.Generator, shape: torch.Size, shift: float, scale: float,
               jitter: float) -> tuple[Tensor, Tensor]:
    """One step's noise (a, b) of `shape` (N, C) or (N, C, L) from `generator`, as the module
    docstring defines it; a stacked member draws its own with this function too."""
    units = shape[1]
    per_unit = (units,) + (1,) * (len(shape) - 2)  # (C,) or (C, 1) for an (N, C, L) input
    u = torch.rand(2, units, generator=generator)
    s = torch.exp((2 * u[0] - 1) * math.log(scale)).view(per_unit)
    m = ((2 * u[1] - 1) * shift).view(per_unit)
    e = torch.randn(2, *shape, generator=generator)
    return s * (1 + jitter * e[0]), m + jitter * e[1]


def noise_layers(model: nn.Module) -> list[NoisyBatchNorm1d]:
    """The model's noisy BN layers, in module order."""
    return [m for m in model.modules() if isinstance(m, NoisyBatchNorm1d)]


def seed_noise(model: nn.Module, seed: int) -> None:
    """Seed each noisy layer's generator from the run's seed (layer k: (seed ^ NOISE_SEED) + k)."""
    for k, layer in enumerate(noise_layers(model)):
        layer.generator.manual_seed((seed ^ NOISE_SEED) + k)
