"""Measurements of *why* batch norm helps, taken at a training step without changing the run.

Santurkar et al. (2018, "How Does Batch Normalization Help Optimization?") test two
explanations against each other:

- Ioffe & Szegedy (2015): BN reduces *internal covariate shift* (ICS), the change of a layer's
  input distribution caused by the updates of the layers before it.
- Santurkar et al.: BN makes the loss landscape *smoother*: the loss and its gradient change
  less along the gradient, so larger steps are safe.

At a probe step t, on that step's batch (x, y), with the parameters w before the step and the
gradient g = grad L(w) (L: the training loss in training mode, i.e. with batch statistics):

`landscape` (Santurkar §3.1, Fig. 4), for each eta = lr * m, m in `multiples`:
    probe/loss_min, probe/loss_max   min and max over eta of L(w - eta g)     (loss variation)
    probe/grad_change                max over eta of ||g - grad L(w - eta g)||  (gradient predictiveness)
    probe/beta                       max over eta of ||g - grad L(w - eta g)|| / ||eta g||
                                     (effective beta-smoothness)
Norms are over all parameters together. The direction is the gradient whatever the optimizer
(with momentum or Adam the step actually taken differs; eta is still a multiple of optim.lr).

`covariate_shift` (Santurkar Definition 2.1), after the step took w to w': for each layer k
with a layer before it (hidden layers 2.. and the output Linear, `head`), with W_k its Linear weight,
    G_k  = grad_{W_k} L(w)                                 (all layers at w)
    G'_k = grad_{W_k} L(w'_1, ..., w'_{k-1}, w_k, ...)      (layers before k updated, k and later not)
    ics/layerK/l2 = ||G_k - G'_k||,   ics/layerK/cos = cos(G_k, G'_k)   (ics/head/... for the output)
"Their update" is the step the optimizer really took on this batch: w - lr g for plain SGD,
the momentum or Adam step otherwise, so nothing is re-derived and every optimizer is covered.

No side effects: every forward pass a probe makes runs in training mode, which moves the BN
running statistics and draws the noisy variant's noise; a `Snapshot` of every parameter, every
buffer and every noise generator is put back bitwise after each pass, so the optimizer's
step and everything after it see exactly what they would without probes. Each forward pass
replays the training step's own noise (the generators are rewound before it). Probes draw no
other random numbers and never touch `.grad` (torch.autograd.grad) or the optimizer.
Results stay on the device (0-dim tensors); the caller syncs when it writes them.

Cost per probe: 1 + len(multiples) forward+backward passes for the landscape and one per
layer for ICS (8 for the default 3 hidden layers and 4 multiples), plus a copy of the
parameters and buffers per pass: about 10 training steps' worth. `train_mode_accuracy` is
the training-mode evaluation of the batch-size study (test/acc_train_mode).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnexp.nn.noise import noise_layers

LossFn = Callable[[Tensor, Tensor], Tensor]


class Snapshot:
    """Copies of a model's parameters, buffers and noise-generator states, to put back bitwise."""

    def __init__(self, model: nn.Module, params: bool = True):
        self.params = [(p, p.detach().clone()) for p in model.parameters()] if params else []
        self.buffers = [(b, b.clone()) for b in model.buffers()]
        self.generators = [(layer.generator, layer.generator.get_state()) for layer in noise_layers(model)]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in (*self.params, *self.buffers):
            live.copy_(saved)
        for generator, state in self.generators:
            generator.set_state(state)

    def saved(self) -> dict[int, Tensor]:
        """The saved parameters by id() of the live tensor."""
        return {id(live): saved for live, saved in self.params}


def _norm(tensors) -> Tensor:
    """The l2 norm of several tensors taken as one vector."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _loss_and_grads(model: nn.Module, x: Tensor, y: Tensor, wrt: list[Tensor], loss_fn: LossFn):
    loss = loss_fn(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, wrt)


def landscape(model: nn.Module, x: Tensor, y: Tensor, lr: float, multiples, before: Snapshot,
              loss_fn: LossFn = F.cross_entropy) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Loss variation, gradient predictiveness and effective beta-smoothness along -g at w.

    `before` is a Snapshot of the model at w; the model is left exactly as it was. Returns the
    gradient g at w (per parameter, in model.parameters() order) and the probe/ values.
    """
    params = list(model.parameters())
    _, g = _loss_and_grads(model, x, y, params, loss_fn)
    g_norm = _norm(g)
    losses, changes, betas = [], [], []
    for m in multiples:
        eta = lr * m
        before.restore()  # w itself, the BN running stats and the step's noise again
        with torch.no_grad():
            torch._foreach_add_(params, g, alpha=-eta)  # w - eta g
        loss, g_eta = _loss_and_grads(model, x, y, params, loss_fn)
        change = _norm(torch._foreach_sub(g, g_eta))
        losses.append(loss)
        changes.append(change)
        betas.append(change / (eta * g_norm))
    before.restore()
    losses = torch.stack(losses)
    return g, {"probe/loss_min": losses.min(), "probe/loss_max": losses.max(),
               "probe/grad_change": torch.stack(changes).max(), "probe/beta": torch.stack(betas).max()}


def ics_layers(model: nn.Module) -> list[tuple[str, nn.Module, Tensor]]:
    """(tag name, module, weight W_k) of each layer of an MLP, from the input: layer1.., then head."""
    layers = [(f"layer{k + 1}", layer, layer.linear.weight) for k, layer in enumerate(model.hidden)]
    return layers + [("head", model.head, model.head.weight)]


def covariate_shift(model: nn.Module, x: Tensor, y: Tensor, grads, before: Snapshot,
                    loss_fn: LossFn = F.cross_entropy) -> dict[str, Tensor]:
    """||G_k - G'_k|| and cos(G_k, G'_k) for every layer with a layer before it (Santurkar Def. 2.1).

    Call it right after the optimizer's step: the model holds w', `before` holds w and `grads`
    the gradient at w (from `landscape`). The model is left at w', as the step left it.
    """
    after = Snapshot(model)
    updated = after.saved()
    index = {id(p): i for i, p in enumerate(model.parameters())}
    layers = ics_layers(model)
    values = {}
    for k in range(1, len(layers)):
        name, _, weight = layers[k]
        before.restore()
        with torch.no_grad():
            for _, module, _ in layers[:k]:
                for p in module.parameters():
                    p.copy_(updated[id(p)])
        _, (g_shifted,) = _loss_and_grads(model, x, y, [weight], loss_fn)
        g = grads[index[id(weight)]]
        values[f"ics/{name}/l2"] = torch.linalg.vector_norm(g - g_shifted)
        values[f"ics/{name}/cos"] = F.cosine_similarity(g.flatten(), g_shifted.flatten(), dim=0)
    after.restore()
    return values


def probed_step(model: nn.Module, x: Tensor, y: Tensor, lr: float, train_step: Callable[[], Tensor],
                multiples, ics: bool = True, loss_fn: LossFn = F.cross_entropy):
    """Run `train_step()` (the real step on batch x, y) with the probes around it.

    Landscape before the step, ICS after it; returns (train_step's loss, {tag: 0-dim tensor}).
    """
    before = Snapshot(model)
    grads, values = landscape(model, x, y, lr, multiples, before, loss_fn)
    loss = train_step()
    if ics:
        values.update(covariate_shift(model, x, y, grads, before, loss_fn))
    return loss, values


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Accuracy in training mode: consecutive chunks of `batch_size` images, each normalized by
    its own batch statistics as in training (a last chunk of one image is left out: BN needs two).

    With the eval-mode accuracy it gives BN's train/eval gap. Running statistics and noise
    generators are put back afterwards. Note: one host sync, at the end.
    """
    snapshot = Snapshot(model, params=False)
    was_training = model.training
    model.train()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    counted = 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        if len(xb) < 2 <= batch_size:
            break
        correct += (model(xb).argmax(dim=1) == y[start:start + batch_size]).sum()
        counted += len(xb)
    snapshot.restore()
    model.train(was_training)
    return correct.item() / counted if counted else float("nan")
