"""Tests for bnexp.run.idx: IDX files round-trip, and a damaged one is rejected by name."""
from __future__ import annotations

import os
import struct

import pytest
import torch

from bnexp.run.idx import DataError, read_idx, write_idx


def test_idx_round_trip_images_and_labels(tmp_path):
    """write_idx then read_idx gives back the same tensor, with the canonical header."""
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), dtype=torch.uint8)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", labels)
    assert torch.equal(read_idx(tmp_path / "img"), images)
    assert torch.equal(read_idx(tmp_path / "lab"), labels)
    img_bytes, lab_bytes = (tmp_path / "img").read_bytes(), (tmp_path / "lab").read_bytes()
    assert struct.unpack(">IIII", img_bytes[:16]) == (2051, 7, 28, 28)
    assert struct.unpack(">II", lab_bytes[:8]) == (2049, 7)
    assert len(img_bytes) == 16 + 7 * 784 and len(lab_bytes) == 8 + 7


@pytest.mark.parametrize("shape", [(0,), (0, 28, 28)])
def test_idx_round_trip_empty(tmp_path, shape):
    """A file of zero items reads back as an empty tensor of the right shape."""
    write_idx(tmp_path / "f", torch.zeros(shape, dtype=torch.uint8))
    assert read_idx(tmp_path / "f").shape == shape


def test_read_idx_names_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}: cannot read it: No such file"):
        read_idx(tmp_path / "nope")


def test_write_idx_replaces_whole_file_and_leaves_no_temp(tmp_path):
    """A second write replaces the first and no temp file is left behind."""
    path = tmp_path / "lab"
    write_idx(path, torch.zeros(5, dtype=torch.uint8))
    write_idx(path, torch.arange(3, dtype=torch.uint8))
    assert torch.equal(read_idx(path), torch.arange(3, dtype=torch.uint8))
    assert sorted(os.listdir(tmp_path)) == ["lab"]


@pytest.mark.parametrize("tensor", [torch.zeros(3, 28, 28), torch.zeros(3, 784, dtype=torch.uint8)])
def test_write_idx_rejects_wrong_dtype_or_shape(tmp_path, tensor):
    """Only uint8 (n,) or (n, rows, cols) can be written; the error names dtype and shape."""
    with pytest.raises(ValueError, match=r"uint8 tensor of shape .* got torch\.\w+ of shape"):
        write_idx(tmp_path / "x", tensor)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cut, word", [(-1, "truncated"), (-784, "truncated")])
def test_read_idx_rejects_truncated_file_naming_it(tmp_path, cut, word):
    """A file shorter than its header claims is rejected with its path and both sizes."""
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match=rf"{path}: {word} IDX file: header says 4 items .* "
                                        rf"file holds {16 + 4 * 784 + cut} bytes"):
        read_idx(path)


def test_read_idx_rejects_padded_bad_magic_and_tiny_files(tmp_path):
    """Extra bytes, an unknown magic number and a file shorter than a header all fail by name."""
    path = tmp_path / "f"
    write_idx(path, torch.zeros(4, dtype=torch.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=rf"{path}: oversized IDX file"):
        read_idx(path)
    path.write_bytes(struct.pack(">II", 2050, 0))
    with pytest.raises(DataError, match=rf"{path}: not an MNIST IDX file: magic number 2050"):
        read_idx(path)
    path.write_bytes(b"\0\0\x08")
    with pytest.raises(DataError, match=rf"{path}: not an IDX file: 3 bytes"):
        read_idx(path)
