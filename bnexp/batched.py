"""K MLPs of one shape as one model: stacked weights, batched matmuls, batch norm per member.

A *member* is one solo `bnexp.model.MLP`; slot k of the stack holds its tensors. Linear
weights are stacked as (K, out, in) and biases as (K, out, 1), so one `torch.bmm` does K
matrix products. Each hidden layer's norm is ONE norm layer of K*C channels, member k owning
channels k*C .. (k+1)*C - 1: batch norm normalizes every channel over the batch on its own,
so the K members' channels side by side give each member exactly the batch statistics,
running estimates and gradients it gets alone. The norm comes from `bnexp.model.make_norm`,
so `custom` is our layer and `native` is torch's, as in a solo run.

Activations are kept feature-major, (K, C, B): a layer is W (K, out, in) @ h (K, in, B), and
its output viewed as (1, K*C, B) is the (N, C, L) input that batch norm takes with N*L = B
values per channel, with no copy. (Batch-major (K, B, C) needed a transposing copy around
every norm, and a transposing copy of every weight gradient: 1.3-1.5x slower.)

Training input is (K, B, 784): each member's own batch. The loss to differentiate is the sum
of the members' mean cross-entropies, whose gradient with respect to member k's tensors is
member k's own gradient. Evaluation gives every member the same images, so the first layer
is one (N, 784) x (784, K*C) product (`forward_shared`).

`StackedSGD` and `StackedAdam` are torch.optim.SGD's and Adam's updates, in torch's order of
operations, with each member's learning rate (and momentum) as a (K, 1) tensor. Both move
state in and out of a member's own torch optimizer, so checkpoints keep the solo format.

Slots never mix: no operation here combines two members' numbers, so a member's results do
not depend on the *values* in the other slots, only on the shapes (K); a finished member's
slot is zeroed and frozen rather than removed, which keeps K, and so every member's
rounding, the same for the whole life of a group (bnexp/group.py relies on this to resume
bitwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.model import ACTIVATIONS, MLP, make_norm

# Evaluation chunks: about this many values per activation tensor (4 MB of float32), so that
# K members x N images never need K full-size copies of the split at once, and a chunk's
# activations stay near the cache for the memory-bound norm and sigmoid passes. For a group of
# 13 convergence runs, chunks of 256 to 2,048 images measured within noise of each other (2-core
# Xeon, one thread); 16 MB chunks were measured only together with the old logits layout, which
# the pair beat by ~25%, so how much of that the chunk size is remains unmeasured.
EVAL_CHUNK_ELEMENTS = 1 << 20


class BatchedMLP(nn.Module):
    """`size` MLPs of the same widths, activation and norm, trained and evaluated at once."""

    def __init__(self, size: int, widths: list[int], activation: str = "sigmoid", norm: str = "none",
                 compile: bool = False, in_features: int = 784, classes: int = 10):
        super().__init__()
        self.size, self.widths, self.classes = size, list(widths), classes
        sizes = [in_features, *widths]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(size, b, a)) for a, b in zip(sizes[:-1], sizes[1:]))
        # a norm replaces the Linear bias with its beta, as in bnexp.model.HiddenLayer
        self.biases = (nn.ParameterList(nn.Parameter(torch.zeros(size, w, 1)) for w in widths)
                       if norm == "none" else None)
        self.norms = (nn.ModuleList(make_norm(norm, size * w, compile) for w in widths)
                      if norm != "none" else None)
        self.activation = ACTIVATIONS[activation]()
        self.head_weight = nn.Parameter(torch.zeros(size, classes, widths[-1]))
        self.head_bias = nn.Parameter(torch.zeros(size, classes, 1))

    def stacks(self) -> dict[str, torch.Tensor]:
        """Each key of a solo MLP's state_dict -> the stacked tensor (parameter or buffer) holding it.

        `num_batches_tracked` is not here: the K*C-channel norm counts once for all members
        (bnexp/group.py keeps each member's count).
        """
        out = {}
        for layer, weight in enumerate(self.weights):
            out[f"hidden.{layer}.linear.weight"] = weight
            if self.biases is not None:
                out[f"hidden.{layer}.linear.bias"] = self.biases[layer]
            if self.norms is not None:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    out[f"hidden.{layer}.norm.{name}"] = getattr(self.norms[layer], name)
        out["head.weight"], out["head.bias"] = self.head_weight, self.head_bias
        return out

    def slots(self) -> dict[str, torch.Tensor]:
        """The stacks viewed as (K, -1): row k of each is member k's tensor, flattened."""
        return {name: t.view(self.size, -1) for name, t in self.stacks().items()}

    def parameter_stacks(self) -> dict[str, nn.Parameter]:
        """The stacked parameters under the names of the solo parameters they hold."""
        return {name: t for name, t in self.stacks().items() if isinstance(t, nn.Parameter)}

    @torch.no_grad()
    def load_member(self, k: int, model: MLP) -> None:
        """Copy a solo MLP's parameters and running statistics into slot k."""
        state = model.state_dict()
        for name, view in self.slots().items():
            view[k].copy_(state[name].reshape(-1))

    @torch.no_grad()
    def store_member(self, k: int, model: MLP) -> None:
        """Copy slot k into a solo MLP (its parameters and running statistics, in place)."""
        state = model.state_dict()
        for name, view in self.slots().items():
            state[name].copy_(view[k].view_as(state[name]))

    @torch.no_grad()
    def zero_slot(self, k: int) -> None:
        """Zero slot k: a finished member's slot keeps computing, on finite numbers only."""
        for view in self.slots().values():
            view[k].zero_()

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, in) -> logits (K, classes, B): member k's MLP on its own batch x[k]."""
        h = x.transpose(1, 2)  # (K, in, B), a view: BLAS reads it transposed
        for layer in range(len(self.weights)):
            h = self._hidden(layer, h)
        return torch.baddbmm(self.head_bias, self.head_weight, h)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> logits (K, N, classes): every member on the same inputs (evaluation).

        The first layer is one product with all K members' weights side by side, which comes
        out as (N, K*C), the layout of an ordinary (N, C) batch-norm input.
        """
        K, n = self.size, x.shape[0]
        first = self.weights[0]
        bias = None if self.biases is None else self.biases[0].view(-1)
        z = F.linear(x, first.view(-1, first.shape[-1]), bias)  # (N, K*C)
        if self.norms is not None:
            z = self.norms[0](z)
        h = self.activation(z).t().view(K, -1, n)  # (K, C, N), a view
        for layer in range(1, len(self.weights)):
            h = self._hidden(layer, h)
        # One row of classes per image: cross-entropy and argmax then read each image's
        # classes contiguously (with the classes in dim 1, as training has them, evaluation's
        # argmax alone took 7% of its time)
        return torch.baddbmm(self.head_bias.transpose(1, 2), h.transpose(1, 2), self.head_weight.transpose(1, 2))

    def _hidden(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Linear -> norm -> activation on feature-major (K, in, B) activations."""
        weight = self.weights[layer]
        if self.biases is None:
            z = torch.bmm(weight, h)
        else:
            z = torch.baddbmm(self.biases[layer], weight, h)
        if self.norms is not None:
            K, C, B = z.shape
            z = self.norms[layer](z.view(1, K * C, B)).view(K, C, B)  # N*L = B values per channel
        return self.activation(z)


def member_losses(model: BatchedMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy on its own batch: x (K, B, in), y (K, B) -> (K,)."""
    return F.cross_entropy(model(x), y, reduction="none").mean(1)  # logits (K, classes, B)


@torch.no_grad()
def evaluate_members(model: BatchedMLP, x: torch.Tensor, y: torch.Tensor,
                     rows: int | None = None) -> tuple[list[float], list[float]]:
    """Each member's mean cross-entropy and accuracy over a whole split, in eval mode.

    The counterpart of bnexp.train.evaluate for K members: per-chunk float32 sums,
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
        logits = model.forward_shared(x[start:start + rows])  # (K, n, classes)
        target = y[start:start + rows]
        losses = F.cross_entropy(logits.flatten(0, 1), target.repeat(K), reduction="none")
        loss_sum += losses.view(K, -1).sum(1).double()
        correct += (logits.argmax(2) == target).sum(1)
    model.train(was_training)
    n = len(x)
    return (loss_sum / n).tolist(), (correct.double() / n).tolist()  # note: host sync, once per eval


# -- optimizers ------------------------------------------------------------------------------


class StackedSGD:
    """torch.optim.SGD (momentum; no dampening, Nesterov or weight decay) for K members at once.

    Per parameter, as torch's single-tensor SGD: buf = momentum * buf + grad (a member's
    first buffer is its gradient: zeros times momentum plus the gradient), then
    param -= lr * buf (or lr * grad without momentum). lr and momentum are (K, 1) columns
    against each parameter viewed as (K, -1).
    """

    def __init__(self, params: dict[str, nn.Parameter], lrs: list[float], momenta: list[float]):
        first = next(iter(params.values()))
        self.params, self.size = params, len(lrs)
        self.settings = {"lr": list(lrs), "momentum": list(momenta)}
        like = {"device": first.device, "dtype": first.dtype}
        self.lr = torch.zeros(self.size, 1, **like)  # 0 until a member is loaded: frozen slots
        self.momentum = torch.zeros(self.size, 1, **like)
        self.buffers = ({name: torch.zeros_like(p) for name, p in params.items()}
                        if any(m != 0 for m in momenta) else {})

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        K = self.size
        for name, p in self.params.items():
            update = p.grad.view(K, -1)
            if self.buffers:
                update = self.buffers[name].view(K, -1).mul_(self.momentum).add_(update)
            p.view(K, -1).addcmul_(update, self.lr, value=-1)

    @torch.no_grad()
    def load_member(self, k: int, model: MLP, optimizer: torch.optim.Optimizer) -> None:
        """Take member k's momentum buffers from its torch SGD (none yet: zeros) and its lr."""
        for name, p in model.named_parameters():
            if self.buffers:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")  # .state[p] would add an entry
                target = self.buffers[name].view(self.size, -1)[k]
                if buf is None:
                    target.zero_()
                else:
                    target.copy_(buf.reshape(-1))
        self.lr[k] = self.settings["lr"][k]
        self.momentum[k] = self.settings["momentum"][k]

    @torch.no_grad()
    def store_member(self, k: int, model: MLP, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
        """Put member k's buffers into its torch SGD's state, as torch keeps them (only with
        momentum, and only once a step was taken)."""
        if not (self.buffers and stepped and self.settings["momentum"][k] != 0):
            return
        for name, p in model.named_parameters():
            buf = self.buffers[name].view(self.size, -1)[k]
            optimizer.state[p]["momentum_buffer"] = buf.view_as(p).clone()

    @torch.no_grad()
    def freeze(self, k: int) -> None:
        """Member k takes no more steps: lr 0 and empty buffers in its slot."""
        self.lr[k] = 0.0
        self.momentum[k] = 0.0
        for buf in self.buffers.values():
            buf.view(self.size, -1)[k].zero_()


class StackedAdam:
    """torch.optim.Adam (no weight decay, no amsgrad) for K members at once.

    As torch's single-tensor Adam: m.lerp_(g, 1 - beta1); v = beta2 * v + (1 - beta2) * g^2;
    param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), the bias
    corrections computed in Python floats from each member's own step count t.
    """

    def __init__(self, params: dict[str, nn.Parameter], lrs: list[float], betas: tuple[float, float],
                 eps: float):
        first = next(iter(params.values()))
        self.params, self.size = params, len(lrs)
        self.settings = {"lr": list(lrs)}
        self.lrs = [0.0] * self.size  # 0 until a member is loaded: frozen slots
        self.betas, self.eps = betas, eps
        self.steps = [0] * self.size
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
        self.device, self.dtype = first.device, first.dtype

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        K, (beta1, beta2) = self.size, self.betas
        self.steps = [t + 1 for t in self.steps]
        like = {"device": self.device, "dtype": self.dtype}
        # note: two (K, 1) host-to-device copies per step
        minus_step_size = torch.tensor([-lr / (1 - beta1 ** t) for lr, t in zip(self.lrs, self.steps)],
                                       **like).view(K, 1)
        correction2_sqrt = torch.tensor([(1 - beta2 ** t) ** 0.5 for t in self.steps], **like).view(K, 1)
        for name, p in self.params.items():
            grad = p.grad.view(K, -1)
            exp_avg = self.exp_avg[name].view(K, -1)
            exp_avg_sq = self.exp_avg_sq[name].view(K, -1)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(self.eps)
            # torch's addcdiv_(exp_avg, denom, value=-step_size) rounds (value * exp_avg) / denom
            p.view(K, -1).add_(exp_avg.mul(minus_step_size).div_(denom))

    @torch.no_grad()
    def load_member(self, k: int, model: MLP, optimizer: torch.optim.Optimizer) -> None:
        """Take member k's moments and step count from its torch Adam (none yet: zeros, 0)."""
        self.steps[k] = 0
        for name, p in model.named_parameters():
            state = optimizer.state.get(p, {})  # .state[p] would add an entry
            for buf, key in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                target = buf[name].view(self.size, -1)[k]
                if key in state:
                    target.copy_(state[key].reshape(-1))
                else:
                    target.zero_()
            if "step" in state:
                self.steps[k] = int(state["step"])
        self.lrs[k] = self.settings["lr"][k]

    @torch.no_grad()
    def store_member(self, k: int, model: MLP, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
        """Put member k's moments and step count into its torch Adam's state, in torch's format."""
        if not stepped:
            return
        for name, p in model.named_parameters():
            optimizer.state[p] = {
                "step": torch.tensor(float(self.steps[k]), dtype=torch.float32),
                "exp_avg": self.exp_avg[name].view(self.size, -1)[k].view_as(p).clone(),
                "exp_avg_sq": self.exp_avg_sq[name].view(self.size, -1)[k].view_as(p).clone(),
            }

    @torch.no_grad()
    def freeze(self, k: int) -> None:
        """Member k takes no more steps: lr 0 and empty moments in its slot."""
        self.lrs[k] = 0.0
        for buf in (*self.exp_avg.values(), *self.exp_avg_sq.values()):
            buf.view(self.size, -1)[k].zero_()


def stacked_optimizer(params: dict[str, nn.Parameter], optimizers: list[torch.optim.Optimizer]):
    """The stacked counterpart of the members' own torch optimizers (all SGD or all Adam)."""
    groups = [opt.param_groups[0] for opt in optimizers]
    lrs = [g["lr"] for g in groups]
    if all(isinstance(opt, torch.optim.SGD) for opt in optimizers):
        _require_defaults(groups, dampening=0, weight_decay=0, nesterov=False, maximize=False)
        return StackedSGD(params, lrs, [g["momentum"] for g in groups])
    if all(isinstance(opt, torch.optim.Adam) for opt in optimizers):
        _require_defaults(groups, weight_decay=0, amsgrad=False, maximize=False)
        betas, eps = groups[0]["betas"], groups[0]["eps"]
        if any(g["betas"] != betas or g["eps"] != eps for g in groups):
            raise ValueError("a batched group needs one Adam betas and eps for all members")
        return StackedAdam(params, lrs, tuple(betas), eps)
    kinds = sorted({type(opt).__name__ for opt in optimizers})
    raise ValueError(f"a batched group trains SGD or Adam members, all of one kind (got {', '.join(kinds)})")


def _require_defaults(groups: list[dict], **expected) -> None:
    """The stacked updates implement these settings only at torch's defaults (bnexp never changes them)."""
    for key, value in expected.items():
        if any(g.get(key, value) != value for g in groups):
            raise ValueError(f"a batched group supports {key}={value!r} only")
