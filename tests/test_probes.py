"""Landscape and ICS probes, training-mode accuracy (bnexp/run/probes.py): the values they define,
and that a run with probes on trains bitwise as one without."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bnexp.config import ConfigError
from bnexp.nn.model import MLP, init_weights
from bnexp.nn.noise import seed_noise
from bnexp.run.probes import Snapshot, covariate_shift, landscape, probed_step, train_mode_accuracy
from bnexp.run.loop import train
from conftest import PROJECT_ROOT, tiny_config
from test_train import read_scalars

MULTIPLES = (0.5, 1.0, 2.0, 4.0)


def small_model(norm: str, seed: int = 0) -> MLP:
    model = MLP([8, 6], "sigmoid", norm, in_features=20,
                noise={"shift": 1.0, "scale": 2.0, "jitter": 0.1} if norm == "custom_noisy" else None)
    init_weights(model, 0.5, torch.Generator().manual_seed(seed))
    seed_noise(model, seed)
    return model


def batch(seed: int = 1, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def twin(model: MLP, norm: str) -> MLP:
    """A separate model holding the same state (parameters, buffers, noise generators)."""
    other = small_model(norm, seed=99)
    other.load_state_dict(model.state_dict())
    return other


def state(model: MLP) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_optimizer_state(a: dict, b: dict):
    """Two optimizer state_dicts hold the same per-parameter state (momentum buffers, Adam moments), bitwise."""
    assert a["state"].keys() == b["state"].keys() and a["param_groups"] == b["param_groups"]
    for key, sa in a["state"].items():
        sb = b["state"][key]
        assert sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[n]), torch.as_tensor(sb[n])) for n in sa)


def grads_at(model: MLP, x, y, params=None):
    loss = F.cross_entropy(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, params or list(model.parameters()))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("norm", ["none", "custom", "native", "custom_noisy"])
def test_landscape_values_are_santurkars_definitions(norm):
    """loss_min/max of L(w - eta g), max ||g - g(w - eta g)|| and its ratio to ||eta g||, computed
    here on twin models; the probed model keeps every tensor, buffer and generator, bitwise."""
    model, (x, y), lr = small_model(norm), batch(), 0.3
    saved, rng = state(model), torch.get_rng_state()
    g, values = landscape(model, x, y, lr, MULTIPLES, Snapshot(model))
    assert_same_state(state(model), saved)
    assert torch.equal(torch.get_rng_state(), rng)
    _, g_ref = grads_at(twin(model, norm), x, y)
    torch.testing.assert_close(flat(g), flat(g_ref))
    losses, changes, betas = [], [], []
    for m in MULTIPLES:
        moved = twin(model, norm)  # same running stats and the step's own noise
        with torch.no_grad():
            for p, gp in zip(moved.parameters(), g_ref):
                p.sub_(lr * m * gp)
        loss, g_eta = grads_at(moved, x, y)
        losses.append(loss)
        changes.append((flat(g_ref) - flat(g_eta)).norm())
        betas.append(changes[-1] / (lr * m * flat(g_ref).norm()))
    torch.testing.assert_close(values["probe/loss_min"], min(losses))
    torch.testing.assert_close(values["probe/loss_max"], max(losses))
    torch.testing.assert_close(values["probe/grad_change"], max(changes))
    torch.testing.assert_close(values["probe/beta"], max(betas))
    assert values["probe/loss_min"] < values["probe/loss_max"]


@pytest.mark.parametrize("norm,momentum", [("custom", 0.0), ("none", 0.9), ("custom_noisy", 0.9)])
def test_ics_is_the_gradient_change_from_the_lower_layers_real_update(norm, momentum):
    """G'_k: layers below k at their values after the optimizer's real step, k and above before it;
    the probed step leaves the model and optimizer exactly as an unprobed step does."""
    model, (x, y), lr = small_model(norm), batch(), 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for seed in (2, 3):  # a momentum buffer that is not just the gradient
        opt.zero_grad()
        F.cross_entropy(model(batch(seed)[0]), batch(seed)[1]).backward()
        opt.step()
    before = twin(model, norm)
    plain = twin(model, norm)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=momentum)
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the buffers

    def step(m, o):
        def run():
            o.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            return loss.detach()
        return run

    loss, values = probed_step(model, x, y, lr, step(model, opt), MULTIPLES)
    assert torch.equal(loss, step(plain, plain_opt)())
    assert_same_state(state(model), state(plain))
    assert_same_optimizer_state(opt.state_dict(), plain_opt.state_dict())
    assert set(values) == {"probe/loss_min", "probe/loss_max", "probe/grad_change", "probe/beta",
                           "ics/layer2/l2", "ics/layer2/cos", "ics/head/l2", "ics/head/cos"}
    after = dict(plain.named_parameters())
    _, g_all = grads_at(twin(before, norm), x, y)
    g_at_w = dict(zip([n for n, _ in before.named_parameters()], g_all))
    for k, name, weight in ((1, "layer2", "hidden.1.linear.weight"), (2, "head", "head.weight")):
        mixed = twin(before, norm)  # the step's own noise again, running stats as before the step
        with torch.no_grad():
            for n, p in mixed.named_parameters():
                if n.startswith("hidden.") and int(n.split(".")[1]) < k:
                    p.copy_(after[n])
        (g_shifted,) = grads_at(mixed, x, y, [dict(mixed.named_parameters())[weight]])[1]
        g = g_at_w[weight]
        torch.testing.assert_close(values[f"ics/{name}/l2"], (g - g_shifted).norm())
        torch.testing.assert_close(values[f"ics/{name}/cos"],
                                   F.cosine_similarity(g.flatten(), g_shifted.flatten(), dim=0))


def test_covariate_shift_is_zero_without_an_update():
    """If the step changed nothing, G' = G: l2 0 and cosine 1 at every layer."""
    model, (x, y) = small_model("custom"), batch()
    before = Snapshot(model)
    grads, _ = landscape(model, x, y, 0.1, (1.0,), before)
    values = covariate_shift(model, x, y, grads, before)
    assert all(values[t].item() == 0 for t in values if t.endswith("/l2"))
    torch.testing.assert_close(torch.stack([values[t] for t in values if t.endswith("/cos")]), torch.ones(2))


@pytest.mark.parametrize("norm", ["custom", "custom_noisy"])
def test_train_mode_accuracy_uses_batch_statistics_and_restores_state(norm):
    """Chunks of batch_size normalized by their own statistics (a last chunk of one is left out);
    running statistics and the noise generator are as before."""
    model, (x, y) = small_model(norm), batch(n=25)
    model.eval()
    saved = state(model)
    acc = train_mode_accuracy(model, x, y, batch_size=6)
    assert_same_state(state(model), saved) and not model.training
    ref, correct = twin(model, norm).train(), 0
    for start in range(0, 24, 6):
        correct += (ref(x[start:start + 6]).argmax(1) == y[start:start + 6]).sum().item()
    assert acc == correct / 24


@pytest.mark.parametrize("norm,optim", [("none", "optim=sgd"), ("custom", "optim.momentum=0.9"),
                                        ("custom_noisy", "optim=adam")])
def test_probes_leave_training_bitwise_unchanged(tiny_mnist, tmp_path, norm, optim):
    """probe.every=7 (inside segments, not at boundaries): the same loss curve, final parameters and
    optimizer state as probe.every=0, and the probe tags at steps 7, 14, ..., 56."""
    runs = {}
    for every in (0, 7):
        run_dir = tmp_path / f"every{every}"
        runs[every] = train(tiny_config(tiny_mnist, f"norm={norm}", optim, f"probe.every={every}"), run_dir,
                            progress="quiet")
    off, on = (read_scalars(tmp_path / f"every{e}") for e in (0, 7))
    assert [e.value for e in off.Scalars("train/loss")] == [e.value for e in on.Scalars("train/loss")]
    assert runs[0]["final"] == runs[7]["final"]
    a, b = (torch.load(tmp_path / f"every{e}" / "checkpoint.pt", weights_only=True) for e in (0, 7))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert_same_optimizer_state(a["optimizer"], b["optimizer"])
    assert not any(t.startswith(("probe/", "ics/")) for t in off.Tags()["scalars"])
    tags = {t for t in on.Tags()["scalars"] if t.startswith(("probe/", "ics/"))}
    assert tags == {"probe/loss_min", "probe/loss_max", "probe/grad_change", "probe/beta",
                    "ics/layer2/l2", "ics/layer2/cos", "ics/head/l2", "ics/head/cos"}
    assert [e.step for e in on.Scalars("probe/beta")] == list(range(7, 61, 7))
    for e_min, e_max in zip(on.Scalars("probe/loss_min"), on.Scalars("probe/loss_max")):
        assert 0 < e_min.value <= e_max.value
    assert all(-1 <= e.value <= 1 for e in on.Scalars("ics/layer2/cos"))


def test_train_mode_accuracy_is_logged_and_summarized(tiny_mnist, tmp_path):
    """probe.train_mode_acc: test/acc_train_mode where the test set is measured (the end, and
    every train.test_every steps if set), and final.test_acc_train_mode."""
    summary = train(tiny_config(tiny_mnist, "probe.train_mode_acc=true"), tmp_path, progress="quiet")
    acc = read_scalars(tmp_path)
    values = acc.Scalars("test/acc_train_mode")
    assert [e.step for e in values] == [e.step for e in acc.Scalars("test/acc")] == [60]
    more = train(tiny_config(tiny_mnist, "probe.train_mode_acc=true", "train.test_every=40"), tmp_path / "more",
                 progress="quiet")
    assert [e.step for e in read_scalars(tmp_path / "more").Scalars("test/acc_train_mode")] == [0, 40, 60]
    assert more["final"]["test_acc_train_mode"] == summary["final"]["test_acc_train_mode"]
    assert summary["final"]["test_acc_train_mode"] == pytest.approx(values[-1].value)
    assert 0.3 < summary["final"]["test_acc_train_mode"] <= 1


@pytest.mark.parametrize("override,named,allowed", [
    ("probe.every=-1", "probe.every=-1", ">= 0 (0 = no probes)"),
    ("probe.multiples=[]", "probe.multiples=[]", "non-empty list of finite numbers > 0"),
    ("probe.multiples=[1,-2]", "probe.multiples=[1.0, -2.0]", "non-empty list of finite numbers > 0"),
    ("norm.position=inside", "norm.position='inside'", "one of before, after"),
    ("norm.noise_scale=0.5", "norm.noise_scale=0.5", "a finite number >= 1"),
    ("norm.noise_shift=-1", "norm.noise_shift=-1.0", "a finite number >= 0"),
    ("probe.every=5 train.tensorboard=false", "probe.every=5", "0 with train.tensorboard=false"),
])
def test_bad_probe_and_norm_values_are_refused(tiny_mnist, override, named, allowed):
    with pytest.raises(ConfigError) as err:
        tiny_config(tiny_mnist, *override.split())
    assert named in str(err.value) and allowed in str(err.value) and "\n" not in str(err.value)


def test_noisy_norm_refuses_compile(tiny_mnist):
    with pytest.raises(ConfigError, match="norm.compile=True is not allowed: false with norm=custom_noisy"):
        tiny_config(tiny_mnist, "norm=custom_noisy", "norm.compile=true")


def test_bench_probes_section_smoke(tmp_path):
    """scripts/bench.py --sections probes --quick: the probe and noisy-variant rows with their ratios."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "bench.py"), "--quick", "--sections",
                             "probes", "--threads", "1", "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {row["what"]: row for row in json.loads(out.read_text())["probes"]}
    assert rows["custom, probes off"]["steps_per_s"] > 0
    assert rows["custom, probe.every=20 (landscape + ICS)"]["steps_per_s"] > 0
    assert rows["custom_noisy, probes off"]["steps_per_s"] > 0
    assert rows["probes off / probe.every=20: run time with probes (target <= 1.15)"]["ratio"] > 0
