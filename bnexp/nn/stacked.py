"""K MLPs of one shape as one model: stacked weights, batched matmuls, each norm per member.

`StackedMLP` is derived from a solo `bnexp.nn.model.MLP`: it has the same modules under the same
names (`hidden.0.linear.weight`, `hidden.0.norm.running_mean`, `head.bias`, ...), each tensor
holding all K members, slot k being member k's. So moving a member in and out of its slot
(`load_member`, `store_member`) walks the solo model's own state_dict: no key is written by
hand, and a new layer in the MLP is stacked by mirroring it here once. Each norm's stacked
form comes from its registry entry (bnexp/nn/registry.py).

Layout. Linear weights are (K, out, in) and biases (K, out, 1), so one `torch.bmm` does K
matrix products. Activations are feature-major, (K, C, B): a layer is W (K, out, in) @ h
(K, in, B), and batch norm sees that output as the (N, C, L) input (1, K*C, B) with N*L = B
values per channel, with no copy: batch norm normalizes every channel on its own, so member k
owning channels k*C .. (k+1)*C - 1 gets exactly its own batch statistics, running estimates
and gradients. (Batch-major (K, B, C) needed a transposing copy around every norm and of every
weight gradient, and was slower: docs/results/measurements.md#stacked-layout.)

Training input is (K, B, 784), each member's own batch; the loss to differentiate is the sum
of the members' mean cross-entropies, whose gradient with respect to member k's tensors is
member k's own. Evaluation gives every member the same images, so the first layer is one
(N, 784) x (784, K*C) product (`forward_shared`).

Slots never mix: no operation combines two members' numbers, so a member's results depend on
the values of its own slot and on K only; a finished member's slot is zeroed and frozen rather
than removed, which keeps K, and so every member's rounding, fixed for the life of a group
(bnexp/run/loop.py relies on this to resume bitwise).

Why not `torch.func.stack_module_state` + `functional_call` + `vmap`: measured side by side it
was slower for every norm, and our layer's autograd.Function has no vmap rule
(docs/results/measurements.md#stacked-layout; `python scripts/bench.py --sections stack`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.nn.compiled import CompiledBatchNorm1d
from bnexp.layers import BatchNorm1d, BatchRenorm1d
from bnexp.nn.noise import draw_noise

# Evaluation chunks: about this many values per activation tensor (4 MB of float32), so that
# K members x N images never need K full-size copies of a split at once, and a chunk's
# activations stay near the cache for the memory-bound norm and sigmoid passes.
EVAL_CHUNK_ELEMENTS = 1 << 20


# -- stacked norms --------------------------------------------------------------------------


class ChannelStack:
    """Mixin for a norm whose channels are independent (batch norm): K members' C channels are
    one layer of K*C channels, applied to (K, C, B) as (1, K*C, B)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        K, C, B = z.shape
        return super().forward(z.view(1, K * C, B)).view(K, C, B)

    def forward_rows(self, z: torch.Tensor) -> torch.Tensor:
        """(N, K*C): every member on the same N inputs (evaluation's first layer)."""
        return super().forward(z)


class StackedBatchNorm1d(ChannelStack, BatchNorm1d):
    """K members of bnexp.layers.BatchNorm1d (norm=custom)."""


class StackedCompiledBatchNorm1d(ChannelStack, CompiledBatchNorm1d):
    """K members of CompiledBatchNorm1d (norm=custom, norm.compile=true)."""


class StackedTorchBatchNorm1d(ChannelStack, nn.BatchNorm1d):
    """K members of torch.nn.BatchNorm1d (norm=native)."""


class StackedNoisyBatchNorm1d(ChannelStack, BatchNorm1d):
    """K members of NoisyBatchNorm1d: one K*C-channel batch norm, then each training member's
    noise drawn from its own generator exactly as its solo layer draws it (bnexp/nn/noise.py), so
    its numbers are its solo run's. Frozen slots draw nothing (their generators stay put)."""

    def __init__(self, members: int, num_features: int, shift: float = 1.0, scale: float = 2.0,
                 jitter: float = 0.1):
        super().__init__(members * num_features)
        self.members, self.shift, self.scale, self.jitter = members, shift, scale, jitter
        self.generators: list[torch.Generator | None] = [None] * members

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = super().forward(z)
        if not self.training:
            return out
        K, C, B = z.shape
        a, b = torch.ones(K, C, B), torch.zeros(K, C, B)
        for k, generator in enumerate(self.generators):
            if generator is not None:  # note: K small CPU draws per layer and step, as K solo runs
                ak, bk = draw_noise(generator, torch.Size((B, C)), self.shift, self.scale, self.jitter)
                a[k], b[k] = ak.t(), bk.t()
        return torch.addcmul(b.to(out.device, out.dtype), out, a.to(out.device, out.dtype))

    def forward_rows(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("forward_rows is evaluation's path: no noise is drawn there")
        return super().forward_rows(z)

    def load_slot(self, k: int, solo: nn.Module) -> None:
        """Slot k draws from a copy of member k's generator from now on."""
        self.generators[k] = torch.Generator().manual_seed(0)
        self.generators[k].set_state(solo.generator.get_state())

    def store_slot(self, k: int, solo: nn.Module) -> None:
        solo.generator.set_state(self.generators[k].get_state())

    def freeze_slot(self, k: int) -> None:
        self.generators[k] = None


class StackedBatchRenorm1d(ChannelStack, BatchRenorm1d):
    """K members of BatchRenorm1d (norm=batch_renorm): r and d are per channel, and the
    schedule reads num_batches_tracked, which is shared (every training member is at one step)."""


class StackedGroupNorm(nn.Module):
    """K members of GroupNorm(groups, C) on (K, C, B): each member's sample b is normalized over
    the C/groups channels of each group, then scaled and shifted per channel (its formulas, the
    same as bnexp.layers.GroupNorm's; a (1, K*C, B) view would mix samples, so it is written for
    this layout). With groups=1 it is layer norm over each sample's C features (StackedLayerNorm)."""

    def __init__(self, members: int, num_features: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(members, num_features, 1))
        self.bias = nn.Parameter(torch.zeros(members, num_features, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        K, C, B = z.shape
        x = z.view(K, self.groups, C // self.groups, B)
        mean = x.mean(dim=2, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=2, keepdim=True)  # biased, as the layer's
        x_hat = (centered * torch.rsqrt(var + self.eps)).view(K, C, B)
        return x_hat * self.weight + self.bias


class StackedLayerNorm(StackedGroupNorm):
    """K members of LayerNorm(C) on (K, C, B): each sample normalized over its C features."""

    def __init__(self, members: int, num_features: int, eps: float = 1e-5):
        super().__init__(members, num_features, groups=1, eps=eps)


# -- the stacked MLP ------------------------------------------------------------------------


class StackedLinear(nn.Module):
    """K Linear layers: weight (K, out, in), bias (K, out, 1) or None; feature-major input."""

    def __init__(self, members: int, template: nn.Linear):
        super().__init__()
        out_features, in_features = template.weight.shape
        self.weight = nn.Parameter(torch.zeros(members, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(members, out_features, 1)) if template.bias is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(K, in, B) -> (K, out, B)."""
        return torch.bmm(self.weight, h) if self.bias is None else torch.baddbmm(self.bias, self.weight, h)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) shared by all members -> (N, K*out): all K weights side by side, one product."""
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.linear(x, self.weight.view(-1, self.weight.shape[-1]), bias)


class StackedHiddenLayer(nn.Module):
    """bnexp.nn.model.HiddenLayer for K members: Linear -> norm -> activation, or the norm after."""

    def __init__(self, members: int, template: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm_after = template.norm_after
        self.linear = StackedLinear(members, template.linear)
        self.norm = norm
        self.activation = type(template.activation)()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.linear(h)
        if self.norm_after:
            return self.norm(self.activation(z))
        return self.activation(self.norm(z))

    def rows(self, z: torch.Tensor, members: int) -> torch.Tensor:
        """Norm and activation of the first layer's (N, K*C) product -> (K, C, N)."""
        n = z.shape[0]
        rows = getattr(self.norm, "forward_rows", None)
        if rows is None and not isinstance(self.norm, nn.Identity):  # a norm over features: its own layout
            z = z.t().reshape(members, -1, n)
            return self.norm(self.activation(z)) if self.norm_after else self.activation(self.norm(z))
        rows = rows or self.norm
        h = rows(self.activation(z)) if self.norm_after else self.activation(rows(z))
        return h.t().view(members, -1, n)  # a view


class StackedMLP(nn.Module):
    """`members` copies of a solo MLP's architecture, trained and evaluated at once.

    template: a solo MLP (its layers' shapes, biases, activation and placement are mirrored);
    stack_norm(members, width): each hidden layer's stacked norm (a registry entry's `stack`
    with the run's norm config: bnexp.nn.registry.stacked_model builds it so).
    """

    def __init__(self, members: int, template: nn.Module, stack_norm):
        super().__init__()
        self.size, self.classes = members, template.head.out_features
        self.widths = [layer.linear.out_features for layer in template.hidden]
        self.hidden = nn.ModuleList(
            StackedHiddenLayer(members, layer, stack_norm(members, layer.linear.out_features))
            for layer in template.hidden)
        self.head = StackedLinear(members, template.head)

    # -- members in and out of their slots -------------------------------------------------

    def slots(self) -> dict[str, torch.Tensor]:
        """Each state_dict tensor viewed as (K, -1), row k being member k's; a tensor of one
        member's size is shared (num_batches_tracked: every training member is at one step)."""
        return {name: t.view(self.size, -1) if t.dim() > 0 else t
                for name, t in self.state_dict(keep_vars=True).items()}

    def parameter_stacks(self) -> dict[str, nn.Parameter]:
        """The stacked parameters under the names of the solo parameters they hold."""
        return dict(self.named_parameters())

    @torch.no_grad()
    def load_member(self, k: int, model: nn.Module) -> None:
        """Copy a solo MLP's state (parameters, buffers, extra state) into slot k."""
        state = model.state_dict()
        for name, view in self.slots().items():
            if view.dim() == 0:
                view.copy_(state[name])
            else:
                view[k].copy_(state[name].reshape(-1))
        self._slot_hooks("load_slot", k, model)

    @torch.no_grad()
    def store_member(self, k: int, model: nn.Module) -> None:
        """Copy slot k into a solo MLP, in place."""
        state = model.state_dict()
        for name, view in self.slots().items():
            state[name].copy_(view if view.dim() == 0 else view[k].view_as(state[name]))
        self._slot_hooks("store_slot", k, model)

    @torch.no_grad()
    def zero_slot(self, k: int) -> None:
        """Zero slot k: a finished member's slot keeps computing, on finite numbers only."""
        for view in self.slots().values():
            if view.dim() > 0:
                view[k].zero_()
        for module in self.modules():
            if hasattr(module, "freeze_slot"):
                module.freeze_slot(k)

    def _slot_hooks(self, hook: str, k: int, model: nn.Module) -> None:
        """Stacked modules with state beyond tensors (a noise generator) move it themselves."""
        solo = dict(model.named_modules())
        for name, module in self.named_modules():
            if hasattr(module, hook):
                getattr(module, hook)(k, solo[name])

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, in) -> logits (K, classes, B): member k's MLP on its own batch x[k]."""
        h = x.transpose(1, 2)  # (K, in, B), a view: BLAS reads it transposed
        for layer in self.hidden:
            h = layer(h)
        return self.head(h)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> logits (K, classes, N): every member on the same inputs (evaluation), in
        training's layout. (Logits with one row of classes per image, (K, N, classes), made the
        head a product with 10 output columns and cross-entropy a softmax over rows of 10: that
        layout's evaluation took 1.4-1.6x this one's, docs/results/measurements.md#stacked-layout.)"""
        first = self.hidden[0]
        h = first.rows(first.linear.rows(x), self.size)
        for layer in self.hidden[1:]:
            h = layer(h)
        return self.head(h)


def member_losses(model: StackedMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy on its own batch: x (K, B, in), y (K, B) -> (K,)."""
    return F.cross_entropy(model(x), y, reduction="none").mean(1)  # logits (K, classes, B)


@torch.no_grad()
def evaluate_members(model: StackedMLP, x: torch.Tensor, y: torch.Tensor,
                     rows: int | None = None) -> tuple[list[float], list[float]]:
    """Each member's mean cross-entropy and accuracy over a whole split, in eval mode.

    The counterpart of bnexp.run.evaluation.evaluate for K members: per-chunk float32 sums,
    accumulated in float64; NaN for an empty split. rows: images per chunk (default: about
    EVAL_CHUNK_ELEMENTS values per activation tensor).
    """
    K = model.size
    if len(x) == 0:
        return [float("nan")] * K, [float("nan")] * K
    was_training = model.training
    model.eval()
    rows = rows or max(1, EVAL_CHUNK_ELEMENTS // (K * max(*model.widths, model.classes)))
    loss_sum = torch.zeros(K, device=x.device, dtype=torch.float64)
    correct = torch.zeros(K, device=x.device, dtype=torch.int64)
    for start in range(0, len(x), rows):
        logits = model.forward_shared(x[start:start + rows])  # (K, classes, n)
        target = y[start:start + rows].expand(K, -1)
        loss_sum += F.cross_entropy(logits, target, reduction="none").sum(1).double()
        correct += (logits.argmax(1) == target).sum(1)
    model.train(was_training)
    n = len(x)
    return (loss_sum / n).tolist(), (correct.double() / n).tolist()  # note: host sync, once per eval
