"""Files written so that a kill at any instant leaves nothing half-written.

Every file goes to a temp file in the same dir, is fsync'ed, then renamed over the target:
a reader sees the old file or the new one, never a mix. Used for IDX files, checkpoints,
model.pt and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


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
