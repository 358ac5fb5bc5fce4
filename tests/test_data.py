"""Tests for bnexp.run.data: the tensors we train on, their split and scaling, read through the real
loader from tiny IDX files written here (fast) or the real MNIST (slow)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bnexp.run.data import MEAN, STD, DataError, load_mnist
from bnexp.run.idx import read_idx, write_idx

PROJECT = Path(__file__).resolve().parents[1]
REAL_ROOT = Path(os.environ.get("BNEXP_DATA", PROJECT / "data"))


def test_load_mnist_shapes_dtypes_and_fixed_split(tiny_mnist):
    """Images (n, 784) float32, labels int64; the last val_size training images are validation."""
    data = load_mnist(tiny_mnist, val_size=50, verify=False)
    raw = tiny_mnist / "MNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte").reshape(300, 784)
    labels = read_idx(raw / "train-labels-idx1-ubyte").long()
    assert data.train_x.shape == (250, 784) and data.val_x.shape == (50, 784)
    assert data.test_x.shape == (100, 784)
    assert data.train_y.shape == (250,) and data.val_y.shape == (50,) and data.test_y.shape == (100,)
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y), (data.test_x, data.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    expected = (images.float() / 255 - MEAN) / STD
    torch.testing.assert_close(data.train_x, expected[:250])
    torch.testing.assert_close(data.val_x, expected[250:])
    assert torch.equal(data.train_y, labels[:250]) and torch.equal(data.val_y, labels[250:])


def test_load_mnist_normalization(tiny_mnist):
    """normalize=False gives byte/255 in [0, 1]; normalize=True is (that - 0.1307) / 0.3081."""
    plain = load_mnist(tiny_mnist, val_size=0, normalize=False, verify=False)
    normed = load_mnist(tiny_mnist, val_size=0, normalize=True, verify=False)
    assert plain.train_x.min() >= 0 and plain.train_x.max() <= 1
    assert set((plain.train_x * 255).round().unique().tolist()) <= set(range(256))
    torch.testing.assert_close(normed.train_x, (plain.train_x - 0.1307) / 0.3081)
    torch.testing.assert_close(normed.test_x, (plain.test_x - 0.1307) / 0.3081)


def test_load_mnist_val_size_zero_gives_empty_validation(tiny_mnist):
    data = load_mnist(tiny_mnist, val_size=0, verify=False)
    assert data.train_x.shape == (300, 784)
    assert data.val_x.shape == (0, 784) and data.val_y.shape == (0,)


@pytest.mark.parametrize("val_size", [300, 301, 10000, -1, 1.5, True, "10"])
def test_load_mnist_rejects_a_val_size_that_is_not_a_count_below_the_training_images(tiny_mnist, val_size):
    """data.val_size's one check: its bound is the number of training images in the files (300 here)."""
    raw = tiny_mnist / "MNIST" / "raw"
    with pytest.raises(DataError) as err:
        load_mnist(tiny_mnist, val_size=val_size, verify=False)
    assert str(err.value) == (f"data.val_size={val_size!r} is not allowed: an integer in [0, 300) "
                              f"(images held out of the 300 training images in {raw})")


def test_load_mnist_rejects_mismatched_label_count(tiny_mnist):
    """Labels and images of one split must pair up; the error names both files."""
    labels = tiny_mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    write_idx(labels, torch.zeros(99, dtype=torch.uint8))
    with pytest.raises(DataError, match=rf"{labels}: holds 99 labels for 100 images in t10k-images"):
        load_mnist(tiny_mnist, verify=False)


@pytest.mark.slow
def test_load_real_mnist_sizes_and_normalized_statistics():
    """60,000 + 10,000 images; the default split is 50,000 / 10,000 (the last 10,000);
    normalized pixels over all 60,000 training images have mean ~0 and std ~1."""
    data = load_mnist(REAL_ROOT)
    assert data.train_x.shape == (50000, 784) and data.val_x.shape == (10000, 784)
    assert data.test_x.shape == (10000, 784) and data.test_y.shape == (10000,)
    train_images = read_idx(REAL_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte")
    assert train_images.shape == (60000, 28, 28)
    last = train_images[50000:].reshape(10000, 784)
    torch.testing.assert_close(data.val_x, (last / 255 - MEAN) / STD)
    all_train = torch.cat([data.train_x, data.val_x]).double()
    mean, std = all_train.mean().item(), all_train.std().item()
    assert abs(mean) < 1e-3 and abs(std - 1) < 1e-3, (mean, std)  # measured: -0.0001, 1.0000
    labels = read_idx(REAL_ROOT / "MNIST" / "raw" / "train-labels-idx1-ubyte").long()
    assert torch.equal(torch.cat([data.train_y, data.val_y]), labels)
