"""Single-run dir names (bnexp/jobs/run_name.py): the stamp, then the overrides that say what the run is."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from bnexp.jobs.run_name import MAX_OVERRIDES_CHARS, hydra_quoted, run_name
from conftest import TINY_OVERRIDES, TRAIN_SCRIPT, run_script

STAMP = "2026-11-29_07-50-38_417183"


def test_overrides_sorted_after_the_stamp():
    assert run_name(STAMP, ["optim.lr=0.1", "norm=none"]) == f"{STAMP}_norm=none,optim.lr=0.1"
    assert run_name(STAMP, ["norm=custom"]) == f"{STAMP}_norm=custom"


def test_no_overrides_is_the_stamp_alone():
    assert run_name(STAMP, []) == STAMP


def test_hydra_settings_and_paths_are_left_out():
    """Paths say where, not what (and a '/' would nest dirs); Hydra's settings are not the run's config."""
    overrides = ["data.root=/tmp/x/data", "hydra.run.dir=a", "hydra/launcher=joblib", "+hydra.verbose=true",
                 "name=rel/dir", "seed=3"]
    assert run_name(STAMP, overrides) == f"{STAMP}_seed=3"


def test_long_override_lists_are_cut_but_stay_distinct():
    a = [f"model.widths=[{','.join(['100'] * 80)}]", "seed=1"]
    b = [f"model.widths=[{','.join(['100'] * 80)}]", "seed=2"]
    name_a, name_b = run_name(STAMP, a), run_name(STAMP, b)
    assert name_a != name_b
    assert len(name_a) == len(STAMP) + 1 + MAX_OVERRIDES_CHARS and len(name_a.encode()) < 255


def test_cli_names_the_run_dir_by_its_overrides(tiny_mnist, tmp_path):
    """The real CLI without hydra.run.dir: outputs/runs/<stamp with microseconds>_<overrides but data.root>."""
    args = [*TINY_OVERRIDES, "norm=none", "optim.lr=0.5"]
    result = run_script(*args, f"data.root={tiny_mnist}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}"
    assert re.fullmatch(f"{stamp}_{re.escape(','.join(sorted(args)))}", run_dir.name), run_dir.name
    assert (run_dir / "summary.json").exists()


@pytest.mark.parametrize("path", [
    "/tmp/outputs/runs/2026-11-29_07-50-38_417183",
    f"/tmp/outputs/runs/{STAMP}_model.widths=[16,16],norm=none,optim.lr=0.1",
    "/tmp/a dir/with 'single' quotes", 'C:\\runs\\"double"\\', "/tmp/both ' and \" \\' \\",
])
def test_resume_command_quotes_run_dirs_so_hydra_reads_them_back(path):
    """cli.resume_command prints hydra.run.dir=<this>: Hydra's own parser must give the path back."""
    override = OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quoted(path)}")
    assert override.value() == path
    if path.endswith("417183"):
        assert hydra_quoted(path) == path  # plain paths stay plain


def test_interrupted_named_run_resumes_with_the_printed_command(tiny_mnist, tmp_path):
    """Ctrl-C a run whose dir name holds '=' and ',': the printed command continues it in that dir."""
    args = ["model.widths=[128,128]", "train.steps=1000", "train.batch_size=20", "train.eval_every=100",
            "train.checkpoint_every=70", "data.val_size=50", "data.verify=false", "threads=1", "device=cpu",
            f"data.root={tiny_mnist}"]  # seconds long: still running when the first checkpoint appears
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs" / "runs").glob("*/checkpoint.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    command = stderr.split("Resume with:")[1].strip().splitlines()[0]
    resumed = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert "resuming from" in resumed.stdout + resumed.stderr and ",model.widths=[128,128]," in run_dir.name
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
