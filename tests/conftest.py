"""Shared pytest fixtures for bnexp."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnexp.run.idx import write_idx


# ============================================================================================
# Tiny MNIST-shaped data (owned by the data module's tests; used by end-to-end tests with
# verify=False). Keep other fixtures outside this block.
# ============================================================================================


def write_tiny_mnist(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Write a small, learnable MNIST look-alike as the four canonical IDX files in
    `<root>/MNIST/raw/` and return that directory.

    Each class has a random 28x28 prototype (about 20% bright pixels); a sample is its class
    prototype with 10% of pixels flipped plus Gaussian noise, so a tiny MLP beats chance
    within a few hundred steps. Labels cycle 0..9 in a shuffled order; same seed, same bytes.
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(10, 28, 28, generator=gen) < 0.2).float() * 220
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]
        flip = torch.rand(n, 28, 28, generator=gen) < 0.1
        images = torch.where(flip, 220 - prototypes[labels], prototypes[labels])
        images = images + 20 * torch.randn(n, 28, 28, generator=gen)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images.round().clamp(0, 255).to(torch.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return raw


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A data root holding tiny learnable MNIST (300 train, 100 test); load with verify=False."""
    root = tmp_path / "data"
    write_tiny_mnist(root)
    return root


# ============================================================================================
# end of the tiny-MNIST block
# ============================================================================================


# ============================================================================================
# Configs and runs (config, model, train, CLI tests)
# ============================================================================================

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from bnexp.config import PROJECT_ROOT, to_config  # noqa: E402
from bnexp.jobs.hydra_setup import compose  # noqa: E402

CONF_DIR = PROJECT_ROOT / "conf"
TRAIN_SCRIPT = PROJECT_ROOT / "scripts" / "train.py"

# A run small enough for unit tests: two hidden layers of 16, 60 steps on tiny data.
TINY_OVERRIDES = [
    "model.widths=[16,16]", "train.steps=60", "train.batch_size=20", "train.eval_every=20",
    "train.checkpoint_every=20", "data.val_size=50", "data.verify=false", "threads=1",
    "device=cpu",
]


compose_config = compose  # conf/config.yaml + overrides, as scripts/train.py composes it


def tiny_config(data_root: Path, *overrides: str):
    """A validated Config for a seconds-long run on the tiny IDX data at data_root."""
    return to_config(compose_config([*TINY_OVERRIDES, f"data.root={data_root}", *overrides]))


def run_script(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
               script: Path = TRAIN_SCRIPT) -> subprocess.CompletedProcess:
    """Run a bnexp script as a user would, in cwd, capturing its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def expected_scalar_tags(layers: int, norm: str) -> set[str]:
    """The TensorBoard scalar tags of docs/design.md#tensorboard-tags for a run with `layers` hidden layers."""
    tags = {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "lr", "summary/steps_to_0.95"}
    tags |= {f"act/layer{k}/p{p}" for k in range(1, layers + 1) for p in (15, 50, 85)}
    if norm != "none":
        tags |= {f"bn/layer{k}/{s}_avg" for k in range(1, layers + 1) for s in ("running_mean", "running_var")}
    return tags


def expected_histogram_tags(layers: int, norm: str) -> set[str]:
    """The histogram tags of docs/design.md#tensorboard-tags: each BN layer's running statistics (none without BN)."""
    if norm == "none":
        return set()
    return {f"bn/layer{k}/{s}" for k in range(1, layers + 1) for s in ("running_mean", "running_var")}
