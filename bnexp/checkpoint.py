"""Checkpoints: save atomically, load or refuse clearly, compare configs before resuming."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from bnexp.atomic import atomic_write

CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Atomically write state (tensors, RNG states, plain data) to run_dir/checkpoint.pt."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint in run_dir, None if there is none; a corrupt one raises CheckpointError."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(
            f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc}); refusing to resume from it. "
            f"Delete it to start over, or run with train.resume=never") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a bnexp checkpoint (no step/config); refusing to resume from it")
    return state


def config_diff(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two flattened configs, as 'key: saved -> current'."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
