"""The IDX file format of MNIST: read one with its structure checked, write one atomically.

An IDX file is a big-endian header, then the raw bytes. MNIST uses two kinds:

    images: magic 2051 (0x0803: unsigned bytes, 3 dims), n, rows, cols, then n*rows*cols bytes
    labels: magic 2049 (0x0801: unsigned bytes, 1 dim),  n,             then n bytes

A file whose size differs from what its header claims is rejected by name: a truncated
download must never be read as garbage.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from bnexp.run.atomic import atomic_write

IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dims (n, rows, cols)
LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dim (n,)


class DataError(Exception):
    """A data problem the user can fix; its message is one line that names the file or value."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an MNIST IDX file: uint8 images (n, rows, cols) or labels (n,).

    Checks the magic number and that the file holds exactly the bytes its header claims,
    so a truncated or padded file is rejected instead of read as garbage.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror or e}") from e
    if len(data) < 8:
        raise DataError(f"{path}: not an IDX file: {len(data)} bytes, shorter than a header")
    magic, n = struct.unpack_from(">II", data)
    if magic == LABELS_MAGIC:
        shape, offset = (n,), 8
    elif magic == IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path}: truncated IDX file: {len(data)} bytes, shorter than a header")
        shape, offset = (n, *struct.unpack_from(">II", data, 8)), 16
    else:
        raise DataError(f"{path}: not an MNIST IDX file: magic number {magic}, "
                        f"expected {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels)")
    expected = offset + _numel(shape)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "oversized"
        raise DataError(f"{path}: {what} IDX file: header says {n} items of shape {shape[1:]} "
                        f"({expected} bytes), file holds {len(data)} bytes; delete it and run again")
    if len(data) == offset:  # torch.frombuffer refuses an empty view
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8, offset=offset).reshape(shape)


def write_idx(path: str | Path, tensor: torch.Tensor) -> None:
    """Write uint8 images (n, rows, cols) or labels (n,) as an IDX file, atomically.

    The bytes go to a temp file in the same directory, are fsync'd, then renamed over `path`:
    readers see the old file or the whole new one, never a half-written one.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise ValueError(f"write_idx: expected a uint8 tensor of shape (n,) or (n, rows, cols), "
                         f"got {tensor.dtype} of shape {tuple(tensor.shape)}")
    magic = LABELS_MAGIC if tensor.dim() == 1 else IMAGES_MAGIC
    header = struct.pack(f">{1 + tensor.dim()}I", magic, *tensor.shape)
    body = tensor.detach().cpu().contiguous().numpy().tobytes()
    atomic_write(Path(path), header + body)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
