"""The noisy-BN control (bnexp/nn/noise.py) and BN placement (norm.position in bnexp/nn/model.py)."""

import math

import pytest
import torch

from bnexp import layers
from bnexp.nn.model import MLP, init_weights, make_norm
from bnexp.nn.noise import NoisyBatchNorm1d, noise_layers, seed_noise
from bnexp.run.loop import train
from conftest import tiny_config
from test_resume import assert_same_outcome, finish, start, wait_for_checkpoint
from test_train import read_scalars


def layer(shift=1.0, scale=2.0, jitter=0.1, units=5, seed=0) -> NoisyBatchNorm1d:
    bn = NoisyBatchNorm1d(units, shift, scale, jitter)
    bn.generator.manual_seed(seed)
    return bn


def test_training_output_is_bn_output_times_a_plus_b_from_its_own_generator():
    """y' = a * y + b with (a, b) = draw() from the layer's generator; the global RNG is untouched."""
    noisy, plain = layer(), layers.BatchNorm1d(5)
    x = torch.randn(40, 5) * 3 + 1
    replay = torch.Generator().set_state(noisy.generator.get_state())
    rng = torch.get_rng_state()
    out = noisy(x)
    assert torch.equal(torch.get_rng_state(), rng)
    noisy.generator.set_state(replay.get_state())
    a, b = noisy.draw(x.shape)
    torch.testing.assert_close(out, a * plain(x) + b)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)  # statistics of the clean input


def test_eval_mode_has_no_noise():
    noisy, plain = layer(), layers.BatchNorm1d(5)
    x = torch.randn(40, 5)
    noisy(x), plain(x)
    noisy.eval(), plain.eval()
    torch.testing.assert_close(noisy(x), plain(x))


def test_the_documented_distribution():
    """Per unit: scale s in [1/S, S] (log-uniform), shift m in [-M, M]; per sample a = s(1 + J e1),
    b = m + J e2. Checked on one large draw: per-unit means and the per-sample spread."""
    bn = layer(shift=0.5, scale=3.0, jitter=0.2, units=400)
    a, b = bn.draw(torch.Size([5000, 400]))
    s, m = a.mean(0), b.mean(0)
    assert s.min() >= 1 / 3 * 0.97 and s.max() <= 3 * 1.03 and m.abs().max() <= 0.5 + 0.02
    log_s = s.log()  # log-uniform on [-ln 3, ln 3]: mean 0, std ln 3 / sqrt(3)
    assert abs(log_s.mean().item()) < 0.07 and log_s.std().item() == pytest.approx(math.log(3) / 3**0.5, rel=0.1)
    assert m.std().item() == pytest.approx(0.5 / 3**0.5, rel=0.1)
    assert (a / s - 1).std().item() == pytest.approx(0.2, rel=0.02)
    assert (b - m).std().item() == pytest.approx(0.2, rel=0.02)


def test_noise_changes_every_step():
    bn = layer(jitter=0.0)
    a1, b1 = bn.draw(torch.Size([3, 5]))
    a2, b2 = bn.draw(torch.Size([3, 5]))
    assert torch.equal(a1[0], a1[1]) and not torch.equal(a1[0], a2[0]) and not torch.equal(b1[0], b2[0])


def test_state_dict_carries_the_generator():
    """A layer loaded from another's state_dict draws the same noise next (what resume relies on)."""
    a, b = layer(seed=1), layer(seed=2)
    x = torch.randn(10, 5)
    a(x)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_seed_noise_gives_each_layer_its_own_stream_from_the_run_seed():
    def model(seed):
        m = MLP([6, 6], "sigmoid", "custom_noisy", in_features=4)
        seed_noise(m, seed)
        return m

    draws = lambda m: [layer.draw(torch.Size([2, 6]))[1] for layer in noise_layers(m)]
    first, again, other = draws(model(0)), draws(model(0)), draws(model(1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])


def test_make_norm_builds_the_noisy_layer_with_its_settings():
    bn = make_norm("custom_noisy", 4, noise={"shift": 0.3, "scale": 1.5, "jitter": 0.0})
    assert type(bn) is NoisyBatchNorm1d and isinstance(bn, layers.BatchNorm1d)
    assert (bn.shift, bn.scale, bn.jitter) == (0.3, 1.5, 0.0)
    with pytest.raises(ValueError, match="noise needs shift >= 0, scale >= 1"):
        NoisyBatchNorm1d(4, scale=0.5)


def test_noisy_run_logs_bn_tags_and_differs_from_custom(tiny_mnist, tmp_path):
    """norm=custom_noisy trains, keeps the bn/ tags of its BN layers, and is not plain custom."""
    noisy = train(tiny_config(tiny_mnist, "norm=custom_noisy"), tmp_path / "noisy", progress="quiet")
    plain = train(tiny_config(tiny_mnist, "norm=custom"), tmp_path / "custom", progress="quiet")
    assert noisy["status"] == "completed" and noisy["final"]["test_acc"] > 0.3
    assert "bn/layer2/running_var_avg" in read_scalars(tmp_path / "noisy").Tags()["scalars"]
    assert noisy["final"]["train_loss"] != plain["final"]["train_loss"]


def test_noisy_run_with_probes_resumes_bitwise_after_kill(tmp_path, tiny_mnist):
    """kill -9 after a checkpoint, then resume: the noise generators come back from the checkpoint,
    so losses, evaluations, probe curves and final parameters equal an uninterrupted run's."""
    extra = ("norm=custom_noisy", "probe.every=100")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    finish(reference, tiny_mnist, *extra)
    proc = start(killed, tiny_mnist, *extra)
    wait_for_checkpoint(killed, proc)
    proc.kill()
    proc.wait()
    assert not (killed / "summary.json").exists()  # it really was cut short
    finish(killed, tiny_mnist, *extra)
    assert_same_outcome(reference, killed)
    probe = lambda d: [(e.step, e.value) for e in read_scalars(d).Scalars("probe/beta")]
    assert probe(reference) == probe(killed) and len(probe(reference)) == 20


@pytest.mark.parametrize("norm", ["custom", "native", "custom_noisy"])
def test_position_after_puts_the_norm_after_the_nonlinearity(norm):
    """norm.position=after: Linear (with bias) -> activation -> norm; preactivations are the Linear's output."""
    model = MLP([8, 6], "sigmoid", norm, in_features=5, position="after")
    init_weights(model, 0.5, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(7, 5)
    assert all(layer.linear.bias is not None for layer in model.hidden)
    h = x
    for layer in model.hidden:
        h = layer.norm(torch.sigmoid(layer.linear(h)))
    torch.testing.assert_close(model(x), model.head(h))
    zs = model.preactivations(x)
    torch.testing.assert_close(zs[0], model.hidden[0].linear(x))


def test_position_after_trains_end_to_end(tiny_mnist, tmp_path):
    summary = train(tiny_config(tiny_mnist, "norm.position=after"), tmp_path, progress="quiet")
    assert summary["status"] == "completed" and summary["config"]["norm.position"] == "after"
    assert summary["final"]["test_acc"] > 0.3
