"""torch.optim.SGD's and Adam's updates for K stacked members at once (bnexp/nn/stacked.py).

Each member keeps its own learning rate (and momentum) as a (K, 1) column against every
parameter viewed as (K, -1), in torch's order of operations. Both optimizers move state in and
out of a member's own torch optimizer, so a member's checkpoint keeps the solo format; a
frozen slot (lr 0, empty state) takes no step.
"""

from __future__ import annotations

import torch
from torch import nn


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
    def load_member(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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
    def store_member(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
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
    def load_member(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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
    def store_member(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
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
