"""This checkout against another version of bnexp, side by side on one machine.

    python scripts/bench_versions.py --against f1b5ace                       # default: solo runs, 3 repeats
    python scripts/bench_versions.py --against f1b5ace --what solo batched   # + experiment=convergence, batched
    python scripts/bench_versions.py --against HEAD~3 --what joblib batched  # the convergence sweep both ways
    python scripts/bench_versions.py --against HEAD~1 --repeats 1 --quick    # seconds: a smoke test

A change that restructures the training loop must not make it slower; this measures that as a
user meets it, through scripts/train.py in each version. The other version is exported
(`git archive`) into a temporary directory and run with its own code first on sys.path (its
scripts, its package); both read the same MNIST (BNEXP_DATA, default: this checkout's data/).
Measurements alternate between the versions and their order rotates per repeat, so a drift
in the machine's speed hits both alike; the table gives medians and the new / old ratio.

    solo    a default run (`python scripts/train.py`, norm=custom) and the same with norm=native:
            train_steps_per_s from summary.json (training steps over the seconds spent in them);
            also custom / native within each version
    batched `python scripts/train.py -m experiment=convergence hydra/launcher=batched`: wall time
            from start to exit, as scripts/bench.py --sections sweep measures it
    joblib  the same sweep with hydra/launcher=joblib (one process per core, each a solo run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.steps=300", "train.eval_every=100", "train.checkpoint_every=300"]


def export(rev: str, into: Path) -> Path:
    """The tree of `rev` as files in `into` (no .git): what a clone of that version holds."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


def train(tree: Path, overrides: list[str], multirun: bool = False) -> tuple[float, Path, str]:
    """Run `tree`'s scripts/train.py with its own package first on the path; (wall s, out dir, stderr)."""
    out = Path(tempfile.mkdtemp(prefix="bench_versions_"))
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1",
           "BNEXP_DATA": os.environ.get("BNEXP_DATA", str(ROOT / "data"))}
    cmd = [sys.executable, str(tree / "scripts" / "train.py"), *(["-m"] if multirun else []), *overrides,
           f"{key}={out}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed in {tree}:\n{result.stderr[-2000:]}")
    return wall, out, result.stderr


def which_package(tree: Path) -> str:
    """Where the bnexp that `tree`'s scripts import lives (to check that each version runs its own)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, "-c", "import bnexp; print(bnexp.__file__)"], cwd=tree, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def solo(tree: Path, norm: str, quick: bool) -> float:
    _, out, _ = train(tree, [f"norm={norm}", "threads=auto", *(QUICK if quick else [])])
    return json.loads((out / "summary.json").read_text())["train_steps_per_s"]


def sweep(tree: Path, launcher: str, quick: bool) -> float:
    extra = ["train.steps=200", "train.eval_every=100", "train.checkpoint_every=200", "seed=0,1"] if quick else []
    # seed=range(5): the 75-run sweep every version's preset had (the preset now runs 10 seeds)
    wall, _, _ = train(tree, ["experiment=convergence", "seed=range(5)", f"hydra/launcher={launcher}", *extra],
                       multirun=True)
    return wall


def cpu_model() -> str:
    """scripts/bench.py's CPU model name (its import loads torch: done once, at the end)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import cpu_model as model

    return model()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the other version: a git revision of this repository")
    parser.add_argument("--this", help="measure this revision instead of the working tree (both exported)")
    parser.add_argument("--what", nargs="+", choices=["solo", "batched", "joblib"], default=["solo"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of this script")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is not allowed: an integer >= 1")
    with tempfile.TemporaryDirectory(prefix="bnexp_old_") as tmp, \
            tempfile.TemporaryDirectory(prefix="bnexp_new_") as tmp_new:
        trees = {"old": export(args.against, Path(tmp)),
                 "new": ROOT if args.this is None else export(args.this, Path(tmp_new))}
        packages = {name: which_package(tree) for name, tree in trees.items()}
        for name, tree in trees.items():
            if not packages[name].startswith(str(tree)):
                raise SystemExit(f"error: the {name} version imports bnexp from {packages[name]}, not from {tree}")
        keys = [f"{what} {norm}" for what in args.what
                for norm in (("custom", "native") if what == "solo" else ("sweep",))]
        values: dict[str, dict[str, list[float]]] = {k: {"old": [], "new": []} for k in keys}
        for repeat in range(args.repeats):
            order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
            for key in keys:
                what, norm = key.split(" ")
                for name in order:
                    value = solo(trees[name], norm, args.quick) if what == "solo" else sweep(trees[name], what, args.quick)
                    values[key][name].append(value)
                    print(f"{key} {name} (repeat {repeat + 1}): {value:.1f}", file=sys.stderr, flush=True)
    rows = []
    for key, by in values.items():
        old, new = statistics.median(by["old"]), statistics.median(by["new"])
        unit = "steps/s" if key.startswith("solo") else "s"  # a sweep: wall seconds
        # a ratio >= 1 means the new version is at least as fast
        ratio = new / old if unit == "steps/s" else old / new
        rows.append({"what": key, "unit": unit, "old": round(old, 1), "new": round(new, 1),
                     "speed new / old": round(ratio, 3), "old repeats": by["old"], "new repeats": by["new"]})
    for name in ("old", "new"):
        if "solo custom" in values:
            c, n = statistics.median(values["solo custom"][name]), statistics.median(values["solo native"][name])
            rows.append({"what": f"custom / native, {name}", "speed new / old": round(c / n, 3)})
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    result = {"against": args.against, "this": args.this or f"working tree at {head}",
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "repeats": args.repeats, "quick": args.quick, "rows": rows}
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items() if "repeats" not in k))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
