"""Engines: what differs between training one plain MLP and K stacked ones, behind one interface.

The loop (bnexp/run/loop.py) owns the members and the schedule; an engine owns the tensors the
steps are taken on. Its interface, for K = `size` slots:

    load(slots, members)            members' models and optimizers -> their slots (start training)
    store(slots, members, stepped)  slots -> members' models (and, with stepped not None, their
                                    optimizers; stepped: whether any step was taken yet)
    freeze(k)                       slot k takes no more steps (finished member)
    step(batches)                   one training step of every slot; batches[k] is slot k's image
                                    indices (None: a frozen slot); returns the (K,) losses
    probed_step(slots, members, batches, stepped)
                                    the same step for `slots`, each with the landscape and ICS
                                    probes around it (bnexp/run/probes.py); returns {k: (loss, values)}
    measure(x, y)                   every slot's mean loss and accuracy on a split (eval mode)

`SoloEngine` (K = 1) trains the member's own `MLP` with its own torch optimizer, in place, so
the model a reader studies is the one a solo run trains; load and store have nothing to move.
`StackedEngine` trains K members as one `StackedMLP` (bnexp/nn/stacked.py) with a stacked
optimizer; a probe step is taken on each member's own model (probes need a member's own loss
landscape), which the engine moves out of and back into the stack around it.

With `graphed`, either engine takes its plain steps through a `GraphedStep`
(bnexp/run/graphs.py): on a GPU, the step is captured once as a CUDA graph and replayed. Both
steps read only tensors whose storage never changes (the dataset, the parameters, the
optimizer's state, updated in place by load/store/freeze), which is what a replay needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnexp.nn.registry import stacked_model
from bnexp.nn.stacked import evaluate_members, member_losses
from bnexp.nn.stacked_optim import stacked_optimizer
from bnexp.run.graphs import GraphedStep
from bnexp.run.probes import probed_step


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: Tensor, y: Tensor, chunk: int = 10_000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split in eval mode; (nan, nan) for an empty split."""
    if len(x) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)  # note: host sync, once per eval


def solo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One optimizer step of one model on one batch; the loss, still on the device."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def solo_probed_step(member, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A member's training step on its own model with the probes around it: same step, plus probe values."""
    x, y = member.data.train_x.index_select(0, idx), member.data.train_y.index_select(0, idx)
    probe = member.cfg.probe
    return probed_step(member.model, x, y, member.lr, lambda: solo_step(member.model, member.optimizer, x, y),
                       probe.multiples, probe.ics)


class SoloEngine:
    """K = 1: the member's own MLP and torch optimizer, trained in place."""

    size = 1

    def __init__(self, member, graphed: bool = False, capture: bool = True):
        self.member = member
        self.model, self.optimizer, self.data = member.model, member.optimizer, member.data
        idx = torch.zeros(member.cfg.train.batch_size, dtype=torch.int64, device=member.device)
        self.graphed = GraphedStep(self.indexed_step, idx, capture) if graphed else None

    def load(self, slots, members) -> None:
        pass  # the member's tensors are the engine's

    def store(self, slots, members, stepped) -> None:
        pass

    def freeze(self, k: int) -> None:
        pass  # a finished solo run takes no more steps: the loop stops

    def train(self) -> None:
        self.model.train()

    def step(self, batches: list[Tensor | None]) -> Tensor:
        return self.indexed_step(batches[0]) if self.graphed is None else self.graphed(batches[0])

    def indexed_step(self, idx: Tensor) -> Tensor:
        """The step on the images `idx` of the device-resident training split (gathered here,
        so that a captured step gathers them too)."""
        x, y = self.data.train_x.index_select(0, idx), self.data.train_y.index_select(0, idx)
        return solo_step(self.model, self.optimizer, x, y)

    def probed_step(self, slots, members, batches, stepped: bool) -> dict[int, tuple[Tensor, dict[str, Tensor]]]:
        return {0: solo_probed_step(self.member, batches[0])}

    def measure(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        loss, acc = evaluate(self.model, x, y)
        return [loss], [acc]


class StackedEngine:
    """K members as one StackedMLP with a stacked optimizer (SGD or Adam, per-member lr)."""

    def __init__(self, members, graphed: bool = False, capture: bool = True):
        first = members[0]
        self.size, self.data = len(members), first.data
        self.model = stacked_model(self.size, first.model, first.cfg.norm).to(first.device)
        self.optimizer = stacked_optimizer(self.model.parameter_stacks(), [m.optimizer for m in members])
        self.dummy = torch.arange(first.cfg.train.batch_size, device=first.device)  # a frozen slot's batch
        idx = self.dummy.expand(self.size, -1)
        self.graphed = GraphedStep(self.indexed_step, idx, capture) if graphed else None

    def load(self, slots, members) -> None:
        for k in slots:
            self.model.load_member(k, members[k].model)
            self.optimizer.load_member(k, members[k].model, members[k].optimizer)

    def store(self, slots, members, stepped) -> None:
        for k in slots:
            self.model.store_member(k, members[k].model)
            if stepped is not None:
                self.optimizer.store_member(k, members[k].model, members[k].optimizer, stepped=stepped)

    def freeze(self, k: int) -> None:
        self.model.zero_slot(k)
        self.optimizer.freeze(k)

    def train(self) -> None:
        self.model.train()

    def step(self, batches: list[Tensor | None]) -> Tensor:
        idx = torch.stack([self.dummy if b is None else b for b in batches])  # (K, B)
        return self.indexed_step(idx) if self.graphed is None else self.graphed(idx)

    def indexed_step(self, idx: Tensor) -> Tensor:
        """One step of every slot, slot k on the images idx[k] of the training split."""
        flat = idx.reshape(-1)
        x = self.data.train_x.index_select(0, flat).view(*idx.shape, -1)
        y = self.data.train_y.index_select(0, flat).view(idx.shape)
        losses = member_losses(self.model, x, y)
        self.optimizer.zero_grad()
        losses.sum().backward()  # d(sum)/d(member k's loss) = 1: each member gets its own gradient
        self.optimizer.step()
        return losses.detach()

    def probed_step(self, slots, members, batches, stepped: bool) -> dict[int, tuple[Tensor, dict[str, Tensor]]]:
        """Each member's step on its own model, probes around it. All are stored before any
        steps and loaded after all, since a shared counter (num_batches_tracked) must move once."""
        self.store(slots, members, stepped=stepped)
        out = {k: solo_probed_step(members[k], batches[k]) for k in slots}
        self.load(slots, members)
        return out

    def measure(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        return evaluate_members(self.model, x, y)
