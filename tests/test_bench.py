"""Smoke test: scripts/bench.py --quick runs end to end and writes the documented JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_quick_writes_machine_and_layer_rows(tmp_path):
    out = tmp_path / "tmp.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "train ratio" in result.stdout and "machine:" in result.stdout
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == 1 and data["machine"]["malloc"] == "glibc default"
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    rows = data["layer"]
    assert [row["shape"] for row in rows if row["device"] == "cpu"] == [[8, 4], [32, 16]]
    for row in rows:
        for key in ("train_native_us", "train_custom_us", "train_ratio",
                    "eval_native_us", "eval_custom_us", "eval_ratio"):
            assert row[key] > 0, key
        assert 0 < row["saved_bytes_custom"] <= row["saved_bytes_native"]
        assert "compile_ratio" not in row  # --quick skips compiling
    training = {row["what"]: row for row in data["training"]}
    for what in ("harness, norm=custom", "harness, norm=native", "DataLoader pipeline, native BN"):
        assert training[what]["steps_per_s"] > 0
    assert training["custom / native (target >= 0.9)"]["ratio"] > 0
    assert training["peak RSS of a smoke run (MiB)"]["ratio"] > 100  # torch alone takes more


def test_bench_steady_malloc_is_recorded(tmp_path):
    """--steady-malloc sets glibc's mallopt and says so in the machine record."""
    out = tmp_path / "steady.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sections", "layer", "--threads", "1",
         "--steady-malloc", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["malloc"].startswith("steady (mallopt")
    assert set(data) == {"machine", "layer"}
    assert all(row["train_custom_faults"] >= 0 for row in data["layer"])


def test_bench_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--threads and --repeats must be >= 1" in result.stderr
