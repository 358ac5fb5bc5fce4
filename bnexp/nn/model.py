"""The MLP under study and the one factory that picks its normalization."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import NormConfig

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def norm_config(norm: str | NormConfig, compile: bool = False, noise: dict | None = None) -> NormConfig:
    """A norm given by name (with compile and noise settings) or as the run's whole NormConfig."""
    if isinstance(norm, NormConfig):
        return norm
    return NormConfig(name=norm, compile=compile, **{f"noise_{k}": v for k, v in (noise or {}).items()})


def make_norm(norm: str | NormConfig, num_features: int, compile: bool = False, noise: dict | None = None) -> nn.Module:
    """The normalization after a hidden Linear, built by its registry entry (bnexp/nn/registry.py):
    none -> Identity, custom -> ours, native -> torch's, custom_noisy -> ours followed by shifting
    noise (`noise` holds its shift, scale, jitter), layer, group, batch_renorm -> ours. Given a
    NormConfig, every key of it applies (norm.groups, norm.r_max, ...).

    compile=True (norm.compile) picks CompiledBatchNorm1d, which fuses our layer's training
    formulas with torch.compile at large inputs (bnexp/nn/compiled.py); its parameters and
    state_dict keys are the same, so checkpoints interchange with the eager layer.
    """
    from bnexp.nn.registry import variant

    cfg = norm_config(norm, compile, noise)
    return variant(cfg.name).make(num_features, cfg)


class HiddenLayer(nn.Module):
    """Linear -> norm -> activation (position "before", Ioffe & Szegedy's placement), or
    Linear -> activation -> norm ("after"). Before the nonlinearity the Linear has no bias with
    a norm: the norm's beta replaces it; after it, the Linear keeps its bias."""

    def __init__(self, fan_in: int, width: int, norm: str | NormConfig, activation: str, compile: bool = False,
                 position: str = "before", noise: dict | None = None):
        super().__init__()
        cfg = norm_config(norm, compile, noise)
        self.norm_after = position == "after"
        self.linear = nn.Linear(fan_in, width, bias=cfg.name == "none" or self.norm_after)
        self.norm = make_norm(cfg, width)
        self.activation = ACTIVATIONS[activation]()

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The input to the nonlinearity (what Ioffe & Szegedy 2015 Fig. 1b,c plot)."""
        z = self.linear(x)
        return z if self.norm_after else self.norm(z)

    def postactivation(self, z: torch.Tensor) -> torch.Tensor:
        """The layer's output from its nonlinearity's input z."""
        a = self.activation(z)
        return self.norm(a) if self.norm_after else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.postactivation(self.preactivation(x))


class MLP(nn.Module):
    """784 -> widths... -> 10 classifier; `hidden[k]` is TensorBoard's `layer{k+1}`.

    norm: a variant's name (with compile and noise), or the run's NormConfig (every key applies).
    """

    def __init__(self, widths: list[int], activation: str = "sigmoid", norm: str | NormConfig = "none",
                 compile: bool = False, in_features: int = 784, classes: int = 10, *,
                 position: str = "before", noise: dict | None = None):
        super().__init__()
        sizes = [in_features, *widths]
        self.hidden = nn.ModuleList(
            HiddenLayer(a, b, norm, activation, compile, position, noise) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)

    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each hidden layer's input to its nonlinearity for the batch x (one forward pass)."""
        out = []
        for layer in self.hidden:
            z = layer.preactivation(x)
            out.append(z)
            x = layer.postactivation(z)
        return out

    def norm_layers(self) -> dict[str, nn.Module]:
        """The batch-norm layers by TensorBoard name (`layer1`, ...); empty for norm=none."""
        return {f"layer{k + 1}": layer.norm for k, layer in enumerate(self.hidden)
                if not isinstance(layer.norm, nn.Identity)}


@torch.no_grad()
def init_weights(model: MLP, std: float, generator: torch.Generator) -> None:
    """Gaussian N(0, std) weights and zero biases, drawn in module order from `generator`.

    Every variant draws the same numbers in the same order (norm layers draw none), so custom and
    native start from identical weights and differ afterwards only by float rounding.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            if module.bias is not None:
                module.bias.zero_()
