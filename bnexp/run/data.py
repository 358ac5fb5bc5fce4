"""MNIST as whole tensors on the training device: the split, the pixel scaling, the checks.

The files come from bnexp.run.fetch (found, or fetched and verified, in `<root>/MNIST/raw/`) and
are read with bnexp.run.idx. Everything then lives on the device as six tensors, so the training
loop slices batches by index and never touches Python per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp.run.fetch import ensure_mnist
from bnexp.run.idx import DataError, read_idx  # DataError: the one error type of data problems (cli.py catches it)

MEAN, STD = 0.1307, 0.3081  # pixel mean and std of the 60,000 training images, in [0, 1] units


@dataclass
class MNIST:
    """MNIST as whole tensors on one device: images (n, 784) float32, labels (n,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_mnist(root: str | Path, val_size: int = 10000, normalize: bool = True,
               device: str | torch.device = "cpu", verify: bool = True) -> MNIST:
    """Load MNIST from `<root>/MNIST/raw/` (fetching it if needed) as tensors on `device`.

    Pixels are byte/255 (as torchvision's ToTensor), then (x - 0.1307) / 0.3081 when
    normalize=True. The last `val_size` of the 60,000 training images are held out for
    validation: a fixed split, the same for every run. Test = the 10,000 t10k images.
    """
    raw = ensure_mnist(root, verify=verify)
    train_x, train_y = _read_split(raw, "train")
    test_x, test_y = _read_split(raw, "t10k")
    cut = len(train_y) - _checked_val_size(val_size, len(train_y), raw)
    train_x, test_x = _pixels(train_x, normalize), _pixels(test_x, normalize)
    tensors = (train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:], test_x, test_y)
    return MNIST(*(t.to(device) for t in tensors))  # note: one host-to-device copy each


def _checked_val_size(val_size, n: int, raw: Path) -> int:
    """data.val_size's only check: its bound is the number of training images in the files,
    which only the data knows (60,000 for MNIST, fewer in a user's own IDX files)."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < n:
        raise DataError(f"data.val_size={val_size!r} is not allowed: an integer in [0, {n}) "
                        f"(images held out of the {n} training images in {raw})")
    return val_size


def _read_split(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one images/labels pair as uint8 images (n, 784) and int64 labels, checking they fit."""
    images_path = raw / f"{prefix}-images-idx3-ubyte"
    labels_path = raw / f"{prefix}-labels-idx1-ubyte"
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{images_path}: expected 28x28 images, got shape {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: holds {labels.numel()} labels for {len(images)} images "
                        f"in {images_path.name}")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images.reshape(len(images), 784), labels.long()


def _pixels(images: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 (n, 784) -> float32 byte/255, standardized with the training-set MEAN and STD."""
    x = images.float().div_(255)
    return x.sub_(MEAN).div_(STD) if normalize else x
