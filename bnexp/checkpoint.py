"""Checkpoints and result files written so that a kill at any instant leaves nothing half-written.

Every file goes to a temp file in the same dir, is fsync'ed, then renamed over the target:
a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to path via temp file + fsync + rename (the dir entry is fsync'ed too)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results should be readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: summary.json stays valid JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, obj: dict) -> None:
    """Atomically write obj as indented JSON (non-finite floats as null)."""
    atomic_write(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


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
