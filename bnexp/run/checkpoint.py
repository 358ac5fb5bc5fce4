"""Checkpoints: what a resume needs, written atomically, read back without running any code.

A checkpoint holds only tensors, numbers, strings, None, lists and dicts: the model's and the
optimizer's state_dicts, every RNG state (uint8 tensors), the data order (a generator state and
an index tensor) and the run's progress as a plain dict. That is all `torch.load(weights_only=True)`
accepts, so loading one never unpickles an arbitrary object: a checkpoint.pt planted or swapped
into a run dir is refused instead of running its code on resume.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from bnexp.run.atomic import atomic_write

CHECKPOINT = "checkpoint.pt"
# Config keys that may change between a run and its resume: how to resume, and whether a GPU
# replays its steps as a CUDA graph (the same kernels either way; absent from checkpoints made
# before the key existed)
IGNORED_ON_RESUME = ("train.resume", "train.cuda_graphs")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(run_dir: Path, *, config: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    order, progress: dict) -> None:
    """Atomically write run_dir/checkpoint.pt: the flattened config, model, optimizer, data order
    (anything with state_dict/load_state_dict), every RNG state and the progress dict."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state = {
        "step": progress["step"],
        "config": config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "order": order.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
        "progress": progress,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def load_checkpoint(run_dir: Path, config: dict) -> dict | None:
    """The checkpoint in run_dir to resume a run of `config` (flattened) from; None if there is none.

    Refused with a one-line CheckpointError, and nothing in it run, when it is corrupt, holds
    anything but plain data, or was made with another config (IGNORED_ON_RESUME aside).
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(
            f"{path}: corrupt checkpoint ({_why(exc)}); refusing to resume from it. "
            f"Delete it to start over, or run with train.resume=never") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a bnexp checkpoint (no step/config); refusing to resume from it")
    diff = config_diff(state["config"], config, ignore=IGNORED_ON_RESUME)
    if diff:
        raise CheckpointError(
            f"{path} was made with another config; differing keys: {'; '.join(diff)}. Use the same "
            f"overrides to resume, another hydra.run.dir, or train.resume=never to start over")
    return state


def _why(exc: Exception) -> str:
    """torch.load's failure in one line; a refused object is named by the global it would have called."""
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
    if refused:
        return f"it holds a pickled object, not plain data: {refused.group(1).strip()}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, order) -> dict:
    """Put a loaded checkpoint's model, optimizer, data order and RNG states back; return its progress dict."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    order.load_state_dict(state["order"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


def config_diff(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two flattened configs, as 'key: saved -> current'."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
