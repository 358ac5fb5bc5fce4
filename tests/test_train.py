"""The step loop (bnexp/run/loop.py) with one member on tiny IDX data written by the test, through the real loader."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.config import ConfigError
from bnexp.run.data import DataError
from bnexp.run.engine import evaluate
from bnexp.run.loop import train
from bnexp.run.order import BatchOrder
from bnexp.run.summary import steps_to_val_acc
from conftest import expected_histogram_tags, expected_scalar_tags, tiny_config


def read_scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_summary_has_every_field_of_the_design(tiny_mnist, tmp_path):
    """summary.json (docs/design.md#summaryjson): status, norm, seed, steps, final metrics,
    thresholds, timing, flat config."""
    cfg = tiny_config(tiny_mnist, "norm=custom", "seed=3")
    summary = train(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "completed" and summary["norm"] == "custom" and summary["seed"] == 3
    assert summary["steps_done"] == 60 and summary["diverged_at_step"] is None
    assert set(summary["final"]) == {"train_loss", "val_acc", "val_loss", "test_acc", "test_loss"}
    assert set(summary["steps_to_val_acc"]) == {"0.90", "0.95", "0.97", "0.98"}
    assert summary["wall_s"] > 0 and summary["train_steps_per_s"] > 0
    assert summary["config"]["norm.name"] == "custom" and summary["config"]["seed"] == 3
    assert summary["final"]["test_acc"] > 0.3  # the tiny data is learnable: well above chance
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("norm", ["none", "custom", "native"])
def test_every_tensorboard_tag_is_written(tiny_mnist, tmp_path, norm):
    """The tags of docs/design.md#tensorboard-tags, at the right steps; BN tags only for BN
    variants; one tag, one kind."""
    train(tiny_config(tiny_mnist, f"norm={norm}"), tmp_path)
    acc = read_scalars(tmp_path)
    scalars, histograms = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    assert scalars == expected_scalar_tags(2, norm)  # BN tags exactly when there is BN
    assert histograms == expected_histogram_tags(2, norm)
    assert not scalars & histograms  # TensorBoard shows a tag of two kinds in neither tab
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 61))
    assert [e.step for e in acc.Scalars("val/acc")] == [0, 20, 40, 60]
    assert [e.step for e in acc.Scalars("test/acc")] == [60]  # the test set once, at the end
    p15, p50, p85 = (acc.Scalars(f"act/layer2/p{p}")[-1].value for p in (15, 50, 85))
    assert p15 <= p50 <= p85
    hparams = acc.PluginTagToContent("hparams")  # in the run itself, not a nested run
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)


def test_same_config_and_seed_give_identical_numbers(tiny_mnist, tmp_path):
    """Determinism on one machine: every loss and metric is bit-for-bit the same."""
    a = train(tiny_config(tiny_mnist), tmp_path / "a")
    b = train(tiny_config(tiny_mnist), tmp_path / "b")
    assert a["final"] == b["final"] and a["steps_to_val_acc"] == b["steps_to_val_acc"]
    la = [e.value for e in read_scalars(tmp_path / "a").Scalars("train/loss")]
    lb = [e.value for e in read_scalars(tmp_path / "b").Scalars("train/loss")]
    assert la == lb


def test_custom_and_native_losses_agree_to_float_rounding(tiny_mnist, tmp_path):
    """Same seed: custom and native draw the same random numbers, so losses differ only by rounding."""
    over = ("train.steps=100", "train.eval_every=100", "train.checkpoint_every=100")
    train(tiny_config(tiny_mnist, "norm=custom", *over), tmp_path / "custom")
    train(tiny_config(tiny_mnist, "norm=native", *over), tmp_path / "native")
    lc = torch.tensor([e.value for e in read_scalars(tmp_path / "custom").Scalars("train/loss")])
    ln = torch.tensor([e.value for e in read_scalars(tmp_path / "native").Scalars("train/loss")])
    assert len(lc) == len(ln) == 100
    assert (lc - ln).abs().max().item() < 1e-4


def test_divergence_is_a_recorded_result(tiny_mnist, tmp_path):
    """A non-finite loss ends the run as 'diverged' with the step it happened at; no exception."""
    summary = train(tiny_config(tiny_mnist, "norm=none", "model.activation=relu", "optim.lr=1e30"), tmp_path)
    assert summary["status"] == "diverged"
    assert 1 <= summary["diverged_at_step"] <= 60
    assert summary["steps_done"] == summary["diverged_at_step"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_steps_to_val_acc_takes_the_first_evaluated_step():
    evals = [{"step": s, "val/acc": a} for s, a in [(0, 0.1), (100, 0.91), (200, 0.9), (300, 0.96)]]
    assert steps_to_val_acc(evals) == {"0.90": 100, "0.95": 300, "0.97": None, "0.98": None}


@pytest.mark.parametrize("test_every,tested", [(0, [60]), (40, [0, 40, 60]), (20, [0, 20, 40, 60])])
def test_the_test_set_is_measured_at_the_end_and_where_asked(tiny_mnist, tmp_path, test_every, tested):
    """Choices are made on validation: test/acc at the last step only, or every train.test_every
    steps if set; the validation curve and every other number are the same either way."""
    summary = train(tiny_config(tiny_mnist, f"train.test_every={test_every}"), tmp_path / "run")
    acc = read_scalars(tmp_path / "run")
    assert [e.step for e in acc.Scalars("test/acc")] == tested
    assert [e.step for e in acc.Scalars("val/acc")] == [0, 20, 40, 60]
    assert summary["final"]["test_acc"] == acc.Scalars("test/acc")[-1].value == pytest.approx(
        summary["final"]["test_acc"])  # the final test numbers are the last step's
    assert summary["final"]["test_acc"] is not None and summary["final"]["test_loss"] is not None


def test_batch_order_is_a_permutation_per_epoch_and_resumes_exactly():
    """Every sample once per epoch (last partial batch dropped); state_dict restores the stream."""
    order = BatchOrder(10, 3, seed=0, device=torch.device("cpu"))
    epoch = torch.cat([order.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9
    state = order.state_dict()
    ahead = [order.next() for _ in range(5)]
    again = BatchOrder(10, 3, seed=99, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [again.next() for _ in range(5)]))


def test_evaluate_counts_loss_and_accuracy_over_the_whole_split():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(25, 4), torch.randint(0, 3, (25,))
    loss, acc = evaluate(model, x, y, chunk=7)
    logits = model(x)
    assert math.isclose(loss, torch.nn.functional.cross_entropy(logits, y).item(), rel_tol=1e-6)
    assert acc == (logits.argmax(1) == y).sum().item() / 25
    assert all(math.isnan(v) for v in evaluate(model, x[:0], y[:0]))


def test_tensorboard_off_writes_no_events_and_the_same_results(tiny_mnist, tmp_path):
    """train.tensorboard=false: no event file; summary numbers identical to a logged run."""
    on = train(tiny_config(tiny_mnist), tmp_path / "on")
    off = train(tiny_config(tiny_mnist, "train.tensorboard=false"), tmp_path / "off")
    assert list((tmp_path / "on").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))
    assert on["final"] == off["final"] and on["steps_to_val_acc"] == off["steps_to_val_acc"]


@pytest.mark.parametrize("override,error,message", [
    ("data.val_size=300", DataError, "data.val_size=300 is not allowed: an integer in [0, 300)"),
    ("data.val_size=-1", DataError, "data.val_size=-1 is not allowed: an integer in [0, 300)"),
    ("train.batch_size=251", ConfigError,
     "train.batch_size=251 is not allowed: at most the training set size, 250 images"),
])
def test_limits_set_by_the_data_are_refused_before_training(tiny_mnist, tmp_path, override, error, message):
    """val_size and batch_size are bounded by the training images in the files (300, 50 held out):
    a value past them is refused in one line and the run dir stays empty."""
    with pytest.raises(error) as err:
        train(tiny_config(tiny_mnist, override), tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "run").iterdir()) == []
