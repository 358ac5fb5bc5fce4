"""bnexp/run/crc32c.py: the event records' checksums, as TensorBoard computes them, only faster."""

import random

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from bnexp.run import crc32c
from bnexp.run.monitor import Monitor


def test_the_standard_check_value():
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # CRC-32C's published check value


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 60, 4095, 4096, 4097, 4099, 8192, 8195, 37_000])
def test_equals_tensorboards_own_checksums(n):
    """Every length class: shorter than the register, block edges, several blocks."""
    rng = random.Random(n)
    for _ in range(3):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert crc32c.crc32c(data) == pywrap_tensorflow.crc32c(data)
        assert crc32c.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_event_files_read_back_with_their_checksums_verified(tmp_path):
    """What a Monitor writes (now checksummed here) passes TensorBoard's reader, which checks
    every record's CRCs and raises on a mismatch."""
    import torch

    monitor = Monitor(tmp_path)
    monitor.scalar("val/acc", 0.5, 3)
    monitor._histogram("bn/layer1/running_var", torch.rand(5000), 3)  # a record of several blocks
    monitor.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    records = list(EventFileLoader(str(events)).Load())
    tags = [v.tag for r in records for v in r.summary.value]
    assert tags == ["val/acc", "bn/layer1/running_var"]
