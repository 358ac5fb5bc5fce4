"""Checkpoints (bnexp/run/checkpoint.py) hold plain data only and load without running code."""

import pytest
import torch

from bnexp.config import flatten
from bnexp.run.checkpoint import CheckpointError
from bnexp.run.loop import train
from conftest import TINY_OVERRIDES, run_script, tiny_config

PLAIN_LEAVES = (torch.Tensor, int, float, str, bool, type(None))
PLAIN_CONTAINERS = (dict, list, tuple)  # tuple: an optimizer's param_groups (Adam's betas)


def leaf_types(value, where="checkpoint") -> dict[str, type]:
    """Every leaf of a nested checkpoint by its path, after checking each container is plain."""
    if isinstance(value, dict):
        return {k: t for key, item in value.items() for k, t in leaf_types(item, f"{where}[{key!r}]").items()}
    if isinstance(value, (list, tuple)):
        return {k: t for i, item in enumerate(value) for k, t in leaf_types(item, f"{where}[{i}]").items()}
    return {where: type(value)}


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_a_checkpoint_is_tensors_and_plain_data(tiny_mnist, tmp_path, optim):
    """What a run saves loads with weights_only=True and is made of tensors, numbers, strings,
    None, lists, tuples and dicts only: RNG states and the data order as uint8/int64 tensors."""
    train(tiny_config(tiny_mnist, f"optim={optim}", "train.steps=20"), tmp_path, progress="quiet")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    odd = {k: t for k, t in leaf_types(state).items() if not issubclass(t, PLAIN_LEAVES)}
    assert odd == {}
    assert state["rng"]["torch"].dtype == torch.uint8 and state["order"]["generator"].dtype == torch.uint8
    assert isinstance(state["progress"], dict) and state["progress"]["step"] == state["step"] == 20


class RunsCode:
    """Unpickling this calls open(path, "w"): the file appearing means the checkpoint ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_runs_nothing(tiny_mnist, tmp_path):
    """A checkpoint.pt planted in a run dir, with the right step and config but a callable inside:
    one line naming it as corrupt, no traceback, the callable never called, nothing trained."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    run_dir.mkdir()
    config = flatten(tiny_config(tiny_mnist))
    torch.save({"step": 20, "config": config, "model": RunsCode(marker)}, run_dir / "checkpoint.pt")
    planted = (run_dir / "checkpoint.pt").read_bytes()
    result = run_script(*TINY_OVERRIDES, f"data.root={tiny_mnist}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {run_dir / 'checkpoint.pt'}: corrupt checkpoint (it holds a "
                                    "pickled object, not plain data: Unsupported global: GLOBAL io.open")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not marker.exists()
    assert (run_dir / "checkpoint.pt").read_bytes() == planted
    assert not (run_dir / "summary.json").exists() and not list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("saved_value", ["<absent>", "off"])
def test_a_run_resumes_whatever_its_cuda_graphs_setting_was(tiny_mnist, tmp_path, saved_value):
    """train.cuda_graphs does not change a run's numbers, so a checkpoint made with another value,
    or before the key existed, resumes; any other config change is still refused."""
    train(tiny_config(tiny_mnist, "train.steps=40", "train.checkpoint_every=20"), tmp_path, progress="quiet")
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    if saved_value == "<absent>":
        del state["config"]["train.cuda_graphs"]
    else:
        state["config"]["train.cuda_graphs"] = saved_value
    state["config"]["train.steps"] = 60  # the same run, asked for more steps ...
    torch.save(state, path)
    (tmp_path / "summary.json").unlink()
    resumed = train(tiny_config(tiny_mnist, "train.steps=60", "train.checkpoint_every=20"), tmp_path, progress="quiet")
    assert resumed["steps_done"] == 60 and resumed["status"] == "completed"
    state["config"]["model.init_std"] = 0.2  # ... but a changed init is another run
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="model.init_std"):
        train(tiny_config(tiny_mnist, "train.steps=60", "train.checkpoint_every=20"), tmp_path, progress="quiet")
