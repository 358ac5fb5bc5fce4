"""Whole training steps as CUDA graphs (bnexp/run/graphs.py) and where device=auto trains.

On a CPU there is nothing to capture: the static-tensor plumbing runs eagerly
(GraphedStep(capture=False)) and must give the plain steps' numbers bit for bit; which runs may be
captured and which device auto picks are decided from the config alone. The tests that capture
and replay need a GPU and are skipped without one, saying so.
"""

import pytest
import torch

from bnexp.config import ConfigError
from bnexp.run.engine import SoloEngine, StackedEngine
from bnexp.run.graphs import GraphedStep, graph_blocker, use_graphs
from bnexp.run.loop import MemberSpec, train, train_group
from bnexp.run.member import Member
from bnexp.run.runtime import choose_device, macs_per_step
from conftest import tiny_config

CUDA = torch.device("cuda")  # a device object only: graph_blocker reads its type
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: capture and replay run on one")


def train_steps(engine, members, steps: int) -> torch.Tensor:
    """`steps` plain training steps of every slot, each member drawing its own batches; the (steps, K) losses."""
    engine.load(range(len(members)), members)
    engine.train()
    losses = torch.stack([engine.step([m.order.next() for m in members]).clone() for _ in range(steps)])
    engine.store(range(len(members)), members, stepped=True)
    return losses


@pytest.mark.parametrize("norm", ["none", "custom", "native", "layer", "group"])
@pytest.mark.parametrize("members", [1, 3])
def test_static_tensor_steps_equal_plain_steps_bit_for_bit(tiny_mnist, tmp_path, norm, members):
    """The graphed engines' step (indices copied into a static tensor, the batch gathered from it
    inside the step, losses from a static output) takes the plain step's numbers exactly."""
    def build(tag, graphed):
        ms = [Member(tiny_config(tiny_mnist, f"norm={norm}", f"seed={k}", f"optim.lr={0.3 * (k + 1)}",
                                 "optim.momentum=0.9"), tmp_path / f"{tag}{k}") for k in range(members)]
        engine = (SoloEngine(ms[0], graphed, capture=False) if members == 1
                  else StackedEngine(ms, graphed, capture=False))
        return ms, engine

    plain_members, plain = build("plain", False)
    static_members, static = build("static", True)
    assert static.graphed is not None and plain.graphed is None
    expected, got = train_steps(plain, plain_members, 25), train_steps(static, static_members, 25)
    assert torch.equal(expected, got)
    for a, b in zip(plain_members, static_members):
        for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.equal(x, y), name
        assert all(torch.equal(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"])
                   for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_graphed_step_reuses_one_index_tensor():
    """Every call copies into the same static index tensor: a captured step reads only that one."""
    seen = []
    step = GraphedStep(lambda idx: (seen.append(idx.data_ptr()), idx.sum())[1], torch.zeros(4, dtype=torch.int64),
                       capture=False)
    sums = [step(torch.arange(4) + k).item() for k in range(3)]
    assert sums == [6, 10, 14] and len(set(seen)) == 1


@pytest.mark.parametrize("overrides,reason", [
    ([], None),
    (["norm=native"], None),
    (["norm=none"], None),
    (["norm=layer"], None),
    (["probe.every=10"], "probe.every > 0"),
    (["norm=custom_noisy"], "norm=custom_noisy: it draws its noise from its own generators"),
    (["norm=batch_renorm"], "norm=batch_renorm: its r_max/d_max schedule reads the batch count on the host"),
    (["optim=adam"], "optim=adam: its bias corrections are computed on the host"),
    (["norm.compile=true"], "norm.compile=true"),
])
def test_which_runs_may_be_captured(tiny_mnist, overrides, reason):
    cfg = tiny_config(tiny_mnist, *overrides)
    blocker = graph_blocker(cfg, CUDA)
    assert blocker is None if reason is None else blocker.startswith(reason), blocker
    assert graph_blocker(cfg, torch.device("cpu")) == "device cpu: CUDA graphs need a GPU"


def test_cuda_graphs_modes(tiny_mnist):
    """auto captures where it can, off never, on refuses in one line where it cannot."""
    plain, probed = tiny_config(tiny_mnist), tiny_config(tiny_mnist, "probe.every=10")
    assert use_graphs(plain, CUDA) == (True, "whole training steps replayed as one CUDA graph")
    assert use_graphs(probed, CUDA)[0] is False
    assert use_graphs(tiny_config(tiny_mnist, "train.cuda_graphs=off"), CUDA) == (False, "train.cuda_graphs=off")
    with pytest.raises(ConfigError, match=r"^train.cuda_graphs=on is not allowed for this run: device cpu: CUDA "
                                          r"graphs need a GPU \(use train.cuda_graphs=auto or off\)$"):
        use_graphs(tiny_config(tiny_mnist, "train.cuda_graphs=on"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.cuda_graphs='sometimes' is not allowed: one of auto, on, off"):
        tiny_config(tiny_mnist, "train.cuda_graphs=sometimes")


def test_cuda_graphs_on_without_a_gpu_is_one_line(tiny_mnist, tmp_path):
    """scripts/train.py's path: the run stops before any step with the reason, nothing half-written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: train.cuda_graphs=on is valid here")
    cfg = tiny_config(tiny_mnist, "train.cuda_graphs=on")
    with pytest.raises(ConfigError, match="device cpu: CUDA graphs need a GPU"):
        train(cfg, tmp_path / "run", progress="quiet")
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def auto(tiny_mnist, *overrides, members=1, gpu=True):
    return choose_device(tiny_config(tiny_mnist, "device=auto", *overrides), members, gpu=gpu)


def test_auto_takes_the_gpu_for_graphed_runs_and_the_cpu_where_the_gpu_would_be_slower(tiny_mnist):
    """A graphed run takes the GPU; an uncaptured small one the CPU, saying why; a big or a
    batched uncaptured one the GPU; no GPU, the CPU; an explicit device as given."""
    assert auto(tiny_mnist).device.type == "cuda"
    small = auto(tiny_mnist, "probe.every=10", "model.widths=[100,100,100]", "train.batch_size=60")
    assert small.device.type == "cpu"
    assert "cannot be captured (probe.every > 0" in small.why and "the GPU would be slower for it" in small.why
    assert "device=cuda forces the GPU" in small.why
    big = auto(tiny_mnist, "probe.every=10", "model.widths=[1000,1000,1000]", "train.batch_size=60")
    assert big.device.type == "cuda" and "still faster than the CPU" in big.why
    group = auto(tiny_mnist, "probe.every=10", "model.widths=[100,100,100]", "train.batch_size=60", members=25)
    assert group.device.type == "cuda"
    assert auto(tiny_mnist, gpu=False).why == "auto: torch sees no CUDA GPU"
    given = choose_device(tiny_config(tiny_mnist, "device=cpu"))
    assert given.device.type == "cpu" and given.why == "device=cpu as given"


def test_macs_per_step_of_the_default_mlp():
    """~36 MFLOP a step at batch 60: 3 x 60 x (784*100 + 100*100 + 100*100 + 100*10) multiply-adds."""
    assert macs_per_step([100, 100, 100], 60) == 3 * 60 * (78_400 + 10_000 + 10_000 + 1_000) == 17_892_000


# -- on a GPU ---------------------------------------------------------------------------------

GPU_RUN = ["device=cuda", "train.steps=200", "train.eval_every=50", "train.checkpoint_every=100"]


def loss_curve(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


@needs_gpu
@pytest.mark.parametrize("norm", ["none", "custom", "native"])
def test_graphed_run_matches_the_eager_run_on_a_gpu(tiny_mnist, tmp_path, norm):
    """Same seed, same batches: a graphed run's losses and final metrics are the eager run's up
    to float rounding (assert_close defaults)."""
    runs = {}
    for mode in ("on", "off"):
        cfg = tiny_config(tiny_mnist, *GPU_RUN, f"norm={norm}", f"train.cuda_graphs={mode}")
        runs[mode] = train(cfg, tmp_path / mode, progress="quiet")
    torch.testing.assert_close(torch.tensor(loss_curve(tmp_path / "on")), torch.tensor(loss_curve(tmp_path / "off")))
    for key in ("val_acc", "val_loss", "test_acc", "test_loss"):
        torch.testing.assert_close(runs["on"]["final"][key], runs["off"]["final"][key])


@needs_gpu
def test_graphed_group_matches_its_eager_twin_on_a_gpu(tiny_mnist, tmp_path):
    """A batched group's captured step: every member as in the uncaptured group, a diverging one included."""
    outcomes = {}
    for mode in ("on", "off"):
        cfgs = [tiny_config(tiny_mnist, *GPU_RUN, "norm=custom", f"train.cuda_graphs={mode}", f"seed={k}",
                            f"optim.lr={lr}") for k, lr in enumerate([0.1, 1.0, 3.0, 1e6])]
        outcomes[mode] = train_group([MemberSpec(c, tmp_path / f"{mode}{k}") for k, c in enumerate(cfgs)])
    for k, (on, off) in enumerate(zip(outcomes["on"], outcomes["off"])):
        assert on.summary["status"] == off.summary["status"]
        torch.testing.assert_close(torch.tensor(loss_curve(tmp_path / f"on{k}")),
                                   torch.tensor(loss_curve(tmp_path / f"off{k}")), equal_nan=True)


@needs_gpu
def test_graphed_run_killed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path, tiny_mnist):
    """kill -9 after the first checkpoint, then the same command: the resumed run (eager warm-up
    steps, then a new capture) ends bit for bit where the uninterrupted graphed run ends."""
    from test_resume import assert_same_outcome, finish, start, wait_for_checkpoint

    import signal

    (tmp_path / "whole").mkdir()
    finish(tmp_path / "whole", tiny_mnist, "device=cuda", "train.cuda_graphs=on")
    (tmp_path / "killed").mkdir()
    proc = start(tmp_path / "killed", tiny_mnist, "device=cuda", "train.cuda_graphs=on")
    wait_for_checkpoint(tmp_path / "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(tmp_path / "killed", tiny_mnist, "device=cuda", "train.cuda_graphs=on")
    assert_same_outcome(tmp_path / "whole", tmp_path / "killed")
