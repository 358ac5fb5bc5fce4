"""bnexp/nn/stacked.py: K stacked MLPs compute what K solo MLPs compute, member by member."""

import pytest
import torch
import torch.nn.functional as F

from bnexp.config import NormConfig
from bnexp.nn.model import MLP, init_weights
from bnexp.nn.registry import stacked_model
from bnexp.nn.stacked import StackedMLP, evaluate_members, member_losses
from bnexp.nn.stacked_optim import stacked_optimizer
from bnexp.nn.noise import seed_noise
from bnexp.run.engine import evaluate

WIDTHS = [16, 12]


# batch_renorm with r and d active from the first step (no hold, no warm-up); 4 groups of 4 and 3
RENORM = {"r_max": 1.5, "d_max": 0.5, "hold_steps": 0, "warmup_steps": 0}


def norm_cfg(norm: str) -> NormConfig:
    return NormConfig(name=norm, **(RENORM if norm == "batch_renorm" else {}))


def solo_models(norm: str, activation: str = "sigmoid", k: int = 3, position: str = "before") -> list[MLP]:
    """k solo MLPs as bnexp.run.member.build_model builds them, each with its own seed and init std."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = MLP(WIDTHS, activation, norm_cfg(norm), position=position)
        init_weights(model, 0.1 * (seed + 1), torch.Generator().manual_seed(seed))
        seed_noise(model, seed)
        models.append(model)
    return models


def stack(models: list[MLP], norm: str, activation: str = "sigmoid") -> StackedMLP:
    batched = stacked_model(len(models), models[0], norm_cfg(norm))
    for k, model in enumerate(models):
        batched.load_member(k, model)
    return batched


@pytest.mark.parametrize("norm,activation,position", [
    ("none", "sigmoid", "before"), ("custom", "relu", "before"), ("native", "tanh", "before"),
    ("custom", "sigmoid", "after"), ("custom_noisy", "sigmoid", "before"), ("custom_noisy", "relu", "after"),
    ("layer", "sigmoid", "before"), ("group", "tanh", "after"), ("batch_renorm", "relu", "before")])
def test_forward_backward_and_running_stats_are_each_members_own(norm, activation, position):
    """Training mode: each member's logits, gradients, updated running stats and noise draws
    are its solo ones, in either position of the norm."""
    models = solo_models(norm, activation, position=position)
    batched = stack(models, norm, activation)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 20, 784, generator=gen), torch.randint(0, 10, (3, 20), generator=gen)
    losses = member_losses(batched, x, y)
    losses.sum().backward()
    grads = {name: p.grad.view(3, -1) for name, p in batched.parameter_stacks().items()}
    for k, model in enumerate(models):
        loss = F.cross_entropy(model(x[k]), y[k])
        loss.backward()
        torch.testing.assert_close(losses[k], loss)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][k].view_as(p), p.grad)
        back = MLP(WIDTHS, activation, norm_cfg(norm), position=position)
        batched.store_member(k, back)  # running statistics and noise generators included
        for name, value in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], value)


@pytest.mark.parametrize("rows", [None, 64], ids=["one-chunk", "chunks-of-64"])
@pytest.mark.parametrize("norm", ["none", "custom", "native", "layer", "group", "batch_renorm"])
def test_shared_evaluation_matches_solo_evaluate(norm, rows):
    """Eval mode on one split, whole or in chunks (the last one short): each member's loss and
    accuracy as bnexp.run.engine.evaluate gives them."""
    models = solo_models(norm)
    batched = stack(models, norm)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # move the running stats away from 0/1 first
        member_losses(batched, torch.randn(3, 30, 784, generator=gen) * 2 + 1, torch.zeros(3, 30, dtype=torch.long))
    for k, model in enumerate(models):
        batched.store_member(k, model)
    x, y = torch.randn(250, 784, generator=gen), torch.randint(0, 10, (250,), generator=gen)
    losses, accs = evaluate_members(batched, x, y, rows)
    assert batched.training  # evaluation leaves the mode as it found it
    for k, model in enumerate(models):
        loss, acc = evaluate(model, x, y)
        assert losses[k] == pytest.approx(loss, rel=1e-6) and accs[k] == acc


def test_store_and_load_are_exact_and_slots_independent():
    """A member copied in and out is bitwise itself; zeroing one slot leaves the others alone."""
    models = solo_models("custom")
    batched = stack(models, "custom")
    batched.zero_slot(1)
    for k in (0, 2):
        back = MLP(WIDTHS, "sigmoid", "custom")
        batched.store_member(k, back)
        assert all(torch.equal(back.state_dict()[n], v) for n, v in models[k].state_dict().items()
                   if not n.endswith("num_batches_tracked"))
    assert all((view[1] == 0).all() for view in batched.slots().values() if view.dim() > 0)  # dim 0: shared counters


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_stacked_optimizers_take_torch_steps_and_keep_torch_state(kind):
    """Given the same gradients, each slot moves as the member's own torch optimizer moves it,
    and the state written back is that optimizer's state_dict (loadable, same keys)."""
    models = solo_models("native")
    batched = stack(models, "native")
    if kind == "sgd":
        optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=mom)
                      for m, lr, mom in zip(models, (0.1, 1.0, 3.0), (0.0, 0.9, 0.5))]
    else:
        optimizers = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(models, (1e-3, 1e-2, 0.1))]
    stacked = stacked_optimizer(batched.parameter_stacks(), optimizers)
    for k, (model, opt) in enumerate(zip(models, optimizers)):
        stacked.load_member(k, model, opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for name, p in batched.parameter_stacks().items():
            p.grad = torch.randn(p.shape, generator=gen)
            for k, model in enumerate(models):
                param = dict(model.named_parameters())[name]
                param.grad = p.grad.view(3, -1)[k].view_as(param).clone()
        stacked.step()
        for opt in optimizers:
            opt.step()
    for k, (model, opt) in enumerate(zip(models, optimizers)):
        back = MLP(WIDTHS, "sigmoid", "native")
        batched.store_member(k, back)
        for name, p in model.named_parameters():
            torch.testing.assert_close(dict(back.named_parameters())[name], p)
        fresh = type(opt)(back.parameters(), **{key: opt.param_groups[0][key] for key in ("lr",)})
        stacked.store_member(k, back, fresh, stepped=True)
        mine, theirs = fresh.state_dict()["state"], opt.state_dict()["state"]
        assert mine.keys() == theirs.keys()
        for i in theirs:
            assert mine[i].keys() == theirs[i].keys()
            for key, value in theirs[i].items():
                torch.testing.assert_close(mine[i][key], value)


def test_mixed_optimizers_are_refused():
    models = solo_models("none", k=2)
    batched = stack(models, "none")
    optimizers = [torch.optim.SGD(models[0].parameters(), lr=0.1), torch.optim.Adam(models[1].parameters())]
    with pytest.raises(ValueError, match="all of one kind"):
        stacked_optimizer(batched.parameter_stacks(), optimizers)
