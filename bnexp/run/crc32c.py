"""CRC-32C of TensorBoard's event records, computed with numpy instead of a Python loop per byte.

Every record of an event file carries two masked CRC-32C checksums (of its length and of its
bytes). Without TensorFlow, TensorBoard computes them in pure Python, one loop turn per byte
(tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c), on the event writer's thread.
Every evaluation writes the running-statistics histograms (the large records) and the scalars,
and checksumming them byte by byte takes milliseconds of that thread's time, in which it also
holds the GIL the training thread needs. A batched group evaluates every member at every eval
point, so on a GPU the checksums were most of a group's training time. `install()` swaps in
`masked_crc32c` below, many times faster on a histogram record; records under 64 bytes
(headers, most scalars) keep a byte loop, which beats numpy's fixed cost there. Record sizes,
per-record and per-evaluation times, and the group's totals (measured:
docs/results/measurements.md#crc32c). The bytes written are identical (tests/test_crc32c.py
checks it against TensorBoard's own function).

How: CRC-32C is linear over GF(2). Starting from register 0, byte b at distance k from the
end contributes A^k(T[b]), where T is the byte table and A the register update for a zero
byte; so the CRC of a block is the XOR of table lookups P[k, b], with P[k] = A^k(T) computed
once. The initial register is folded into the first four bytes (XOR), which is where a
reflected CRC reads it from; longer data goes block by block, each block's register folded
into the next block's first four bytes.
"""

from __future__ import annotations

import numpy as np

POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected
# Bytes per table block: P is BLOCK x 256 x 4 B = 4 MiB, built once by install()
# (its build time, measured: docs/results/measurements.md#crc32c)
BLOCK = 4096
_P: np.ndarray | None = None


def _byte_table() -> np.ndarray:
    """T[b]: the register after one byte b from register 0."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(POLY), table >> 1).astype(np.uint32)
    return table


def _block_table() -> np.ndarray:
    """P[k, b] = A^k(T[b]): what byte b contributes when k bytes follow it in the block."""
    global _P
    if _P is None:
        t = _byte_table()
        p = np.empty((BLOCK, 256), dtype=np.uint32)
        p[0] = t
        for k in range(1, BLOCK):
            p[k] = (p[k - 1] >> 8) ^ t[p[k - 1] & 0xFF]
        _P = p
    return _P


# Bytes below which the plain byte loop beats numpy's fixed cost per call (headers: 8 bytes;
# measured: docs/results/measurements.md#crc32c)
SHORT = 64
_T = [int(v) for v in _byte_table()]


def _bytewise(register: int, data: bytes) -> int:
    """The register after data, one table lookup per byte (TensorBoard's own loop)."""
    for b in data:
        register = (register >> 8) ^ _T[(register ^ b) & 0xFF]
    return register


def crc32c(data: bytes) -> int:
    """CRC-32C of data (initial register and final XOR 0xFFFFFFFF), as TensorBoard's crc32c."""
    if len(data) < SHORT:
        return _bytewise(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    p = _block_table()
    register = 0xFFFFFFFF
    view = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, len(view), BLOCK):
        block = view[start:start + BLOCK].astype(np.uint32)
        if len(block) < 4:  # a tail too short to hold the register
            register = _bytewise(register, data[start:])
            continue
        block[:4] ^= np.array([(register >> s) & 0xFF for s in (0, 8, 16, 24)], dtype=np.uint32)
        register = int(np.bitwise_xor.reduce(p[np.arange(len(block) - 1, -1, -1), block]))
    return register ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord framing stores (rotated right by 15 bits, plus a constant)."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def install() -> None:
    """Make TensorBoard's record writer (which torch's SummaryWriter uses) checksum with this
    module. Idempotent; the records it writes are byte for byte those it wrote before."""
    from tensorboard.summary.writer import record_writer

    _block_table()  # here, once: not on the writer threads, where each group member has its own
    record_writer.masked_crc32c = masked_crc32c
