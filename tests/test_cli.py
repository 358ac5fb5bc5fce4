"""scripts/train.py end to end, as a subprocess, on tiny IDX data through the real loader."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_OVERRIDES, expected_scalar_tags, run_script


def test_single_run_writes_summary_events_and_model(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(*TINY_OVERRIDES, f"data.root={tiny_mnist}", "norm=custom",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 60
    assert list(run_dir.glob("events.out.tfevents.*"))  # in the run dir itself, not nested
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == expected_scalar_tags(2, "custom")
    assert (run_dir / "model.pt").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert "done completed: norm=custom" in result.stderr + result.stdout


def test_multirun_names_run_dirs_by_overrides(tiny_mnist, tmp_path):
    """-m norm=none,custom,native: three runs, dirs named like norm=custom for TensorBoard."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", *TINY_OVERRIDES, f"data.root={tiny_mnist}", "norm=none,custom,native",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    names = [p.name for p in runs]
    assert len(runs) == 3 and not any("data.root" in n for n in names)  # paths excluded: no nesting
    assert {json.loads((r / "summary.json").read_text())["norm"] for r in runs} == {"none", "custom", "native"}
    assert any("norm=custom" in n.split(",") for n in names), names


def test_diverged_run_exits_zero(tiny_mnist, tmp_path):
    """A diverged run is a result: exit 0 so a sweep goes on; status recorded."""
    run_dir = tmp_path / "run"
    result = run_script(*TINY_OVERRIDES, f"data.root={tiny_mnist}", "norm=none", "model.activation=relu", "optim.lr=1e30",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
