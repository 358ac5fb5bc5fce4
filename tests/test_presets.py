"""Every conf/experiment/*.yaml preset trains end to end, so that none can rot unnoticed.

The preset's own values stay (model, optimizer, batch size...); only what would take minutes is
shrunk: steps, evaluation and checkpoint periods, and the data, which is the tiny IDX set.
"""

import pytest
from omegaconf import OmegaConf

from bnexp.config import flatten, to_config
from bnexp.run.loop import train
from conftest import CONF_DIR, compose_config

PRESETS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
SHRINK = {  # key -> tiny value: everything a preset sets that takes minutes or needs the real MNIST
    "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
    "data.val_size": 50, "data.verify": False, "device": "cpu",
}


def test_the_presets_are_found():
    assert {"smoke", "ioffe2015", "convergence"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs(preset, tiny_mnist, tmp_path):
    """Composes (its launcher and sweeper settings too: Hydra resolves them), validates, trains
    4 steps with 3 evaluations and 2 checkpoints, and keeps every value of its own but the shrunk
    ones. In process, as one run: the preset's launcher is composed but launches nothing."""
    own = flatten(to_config(compose_config([f"experiment={preset}"])))
    raw = compose_config([f"experiment={preset}"])
    derived = {k for k in own if "." in k and OmegaConf.is_interpolation(OmegaConf.select(raw, k.rsplit(".", 1)[0]),
                                                                         k.rsplit(".", 1)[1])}
    shrink = [f"{key}={value}" for key, value in SHRINK.items()]
    cfg = to_config(compose_config([f"experiment={preset}", f"data.root={tiny_mnist}", *shrink]))
    summary = train(cfg, tmp_path, progress="quiet")
    assert summary["status"] == "completed" and summary["steps_done"] == 4
    assert summary["config"]["name"] == preset
    assert {k for k, v in own.items() if summary["config"][k] != v} <= {*SHRINK, "data.root", *derived}
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "model.pt").exists()
