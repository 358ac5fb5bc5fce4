"""A single run's dir name: its start time, then the overrides that make it what it is.

    outputs/runs/2026-11-29_07-50-38_417183_norm=custom
    outputs/runs/2026-11-29_07-50-38_502114_norm=none,optim.lr=0.1
    outputs/runs/2026-11-29_07-50-39_004127                 # no overrides: the stamp alone

TensorBoard lists a run by its dir, so this is the name people compare runs by. The stamp keeps
microseconds: two runs started in the same instant with the same overrides never share a dir.
conf/config.yaml builds `hydra.run.dir` from it through the `bnexp.jobs.run_name` resolver
(registered in bnexp.jobs.hydra_setup.register_configs); sweeps name their jobs by Hydra's own
`${hydra.job.override_dirname}`, with the same `key=value,key=value` look.
"""

from __future__ import annotations

import hashlib
import re

MAX_OVERRIDES_CHARS = 200  # a dir name may have 255 bytes; the stamp takes 26
PATH_KEYS = ("data.root",)  # paths say where, not what; a `/` in a value would also nest dirs


def _key(override: str) -> str:
    """The key of an override line: `+a.b=1` -> `a.b`, `hydra/launcher=x` -> `hydra/launcher`."""
    return override.split("=", 1)[0].lstrip("+~")


def names_the_run(override: str) -> bool:
    """Overrides that go into the name: not Hydra's own settings, not paths."""
    key = _key(override)
    value = override.split("=", 1)[1] if "=" in override else ""
    hydra_setting = key == "hydra" or key.startswith(("hydra.", "hydra/"))
    return not (hydra_setting or key in PATH_KEYS or "/" in value or "\\" in value)


def run_name(stamp: str, overrides) -> str:
    """`<stamp>_<overrides sorted, comma-joined>`, or the stamp alone when nothing is overridden.

    Overrides beyond MAX_OVERRIDES_CHARS are cut and end in a hash of the whole list, so two
    long lists still get different names.
    """
    kept = sorted(str(o) for o in overrides if names_the_run(str(o)))
    if not kept:
        return stamp
    text = ",".join(kept)
    if len(text) > MAX_OVERRIDES_CHARS:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[:MAX_OVERRIDES_CHARS - 10]}..{digest}"
    return f"{stamp}_{text}"


def hydra_quoted(value: str) -> str:
    """`value` as an override's right-hand side that Hydra reads back unchanged.

    A run dir named like `..._norm=none,optim.lr=0.1` is no plain override value (`=` and `,`
    mean something to Hydra's grammar), so it is quoted; plain paths stay as they are.
    """
    if re.fullmatch(r"[\w./-]+", value):
        return value
    quote = '"' if '"' not in value else "'"
    # Hydra's quoted strings: a quote is escaped by a backslash, and backslashes right before a
    # quote (or before the closing one) are doubled
    escaped = re.sub(r"(\\*)(" + quote + r"|$)", lambda m: m.group(1) * 2 + ("\\" + quote if m.group(2) else ""),
                     value)
    return f"{quote}{escaped}{quote}"
