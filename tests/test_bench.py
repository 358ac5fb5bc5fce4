"""Smoke test: scripts/bench.py --quick runs end to end and writes the documented JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_bench_sweep_options_are_checked():
    """--sweep-launchers takes only SWEEP_LAUNCHERS' names; --sweep-device cuda needs a GPU."""
    import torch

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--sections", "sweep", *args],
                              capture_output=True, text=True, timeout=60)

    result = run("--sweep-launchers", "batched, n_jobs=9")
    assert result.returncode == 2 and "invalid choice: 'batched, n_jobs=9'" in result.stderr
    if not torch.cuda.is_available():
        result = run("--sweep-device", "cuda")
        assert result.returncode == 2
        assert "--sweep-device cuda: torch sees no CUDA GPU on this machine (allowed here: cpu)" in result.stderr


@pytest.mark.slow  # four processes, two of them beside a busy loop (time: docs/results/measurements.md#test-timings)
def test_bench_threads_section_compares_one_and_two_threads(tmp_path):
    """--sections threads: per wait policy and shape, 1 and 2 threads alone and beside a busy
    loop, each in a process of its own; the measured and the configured crossover."""
    out = tmp_path / "threads.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sections", "threads", "--repeats", "1",
         "--min-time", "0.01", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "threads"} and data["machine"]["cores"] >= 1
    measured = [row for row in data["threads"] if "idle_1" in row]
    assert [(row["policy"], row["shape"]) for row in measured] == [
        ("passive", "60 x 100"), ("passive", "256 x 256"), ("spin", "60 x 100"), ("spin", "256 x 256")]
    for row in measured:
        assert min(row["idle_1"], row["idle_2"], row["busy_1"], row["busy_2"]) > 0
    assert measured[0]["work_m"] == 1.491 and measured[0]["auto"] == 1
    summary = {row["shape"]: row for row in data["threads"] if "idle_1" not in row}
    assert set(summary) == {"measured crossover, alone", "measured crossover, beside a busy loop",
                            "bnexp.run.runtime crossover"}
    assert "2t/1t busy" in result.stdout


@pytest.mark.slow
def test_bench_load_section_runs_default_runs(tmp_path):
    """--sections load --quick on the real MNIST: the old default and auto, each alone, beside a busy
    loop and in a pair, through scripts/train.py; auto resolves to 1 thread for the default MLP.
    (threads=1 and 2 are the same code path with other values; tests/test_runtime.py checks their logs.)"""
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sections", "load", "--repeats", "1",
         "--load-steps", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["threads"]: row for row in json.loads(out.read_text())["load"]}
    assert list(rows) == ["2, spin (the old default)", "auto"]
    for row in rows.values():
        assert min(row["alone"], row["busy"], row["pair"]) > 0 and row["steps"] == 20
    assert rows["auto"]["log"].startswith("1 (auto: 1, 1.5M multiply-adds per op < crossover")
    assert rows["2, spin (the old default)"]["log"] == "2 (threads=2 as given; GOMP_SPINCOUNT=300000)"


@pytest.mark.slow
def test_bench_sweep_section_runs_both_launchers_and_the_k_curve(tmp_path):
    """--sections sweep --quick: a tiny convergence sweep with joblib and with the batched
    launcher (every run completes), and the model-steps/s curve for K = 1 and 5."""
    out = tmp_path / "sweep.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sections", "sweep", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["what"]: row for row in json.loads(out.read_text())["sweep"]}
    for name in ("joblib", "batched"):
        assert rows[f"experiment=convergence, {name} (6 runs completed)"]["wall_s"] > 0
    assert rows["joblib / batched wall time (target >= 2.5, aim 4)"]["ratio"] > 0
    assert [w for w in rows if w.startswith("cpu: group of")] == ["cpu: group of K=1", "cpu: group of K=5"]
    for k in (1, 5):
        assert rows[f"cpu: group of K={k}"]["model_steps_per_s"] > 0
    assert rows["cpu: group of K=1"]["ratio"] == 1.0


def test_bench_device_section_measures_graphs_no_graphs_and_cpu_or_says_why_not(tmp_path):
    """--sections device: on a GPU, graphs / no graphs / CPU rows for each of none, custom and
    native with the speed targets' ratios; without one, a single row that says so."""
    out = tmp_path / "device.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--sections", "device", "--repeats", "1",
                             "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["device"]
    if not torch.cuda.is_available():
        assert rows == [{"what": "no CUDA GPU on this machine: nothing to measure (run it where torch sees one)"}]
        return
    whats = [row["what"] for row in rows]
    for norm in ("none", "custom", "native"):
        for way in ("GPU, CUDA graphs", "GPU, no graphs", "CPU"):
            row = rows[whats.index(f"norm={norm}, {way}")]
            assert row["steps_per_s"] > 0 and row["wall_s"] > 0
        assert f"norm={norm}: graphs / no graphs, steps/s (target >= 10)" in whats
