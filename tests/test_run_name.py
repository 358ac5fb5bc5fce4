"""Single-run dir names (bnexp/run_name.py): the stamp, then the overrides that say what the run is."""

import re

from bnexp.run_name import MAX_OVERRIDES_CHARS, run_name
from conftest import TINY_OVERRIDES, run_script

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
