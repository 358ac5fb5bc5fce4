"""Config composition, types and value checks (bnexp/config.py, conf/)."""

import math

import pytest

from bnexp.config import AdamConfig, Config, ConfigError, SGDConfig, flatten, to_config
from conftest import compose_config, run_script


@pytest.mark.parametrize("norm", ["none", "custom", "native", "custom_noisy", "layer", "group", "batch_renorm"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_every_norm_and_optim_composes_and_validates(norm, optim):
    """Each option of the norm and optim groups composes into a typed, valid Config."""
    cfg = to_config(compose_config([f"norm={norm}", f"optim={optim}"]))
    assert isinstance(cfg, Config)
    assert cfg.norm.name == norm
    assert isinstance(cfg.optim, SGDConfig if optim == "sgd" else AdamConfig)
    assert cfg.optim.name == optim and cfg.optim.lr > 0


def test_defaults_match_the_design():
    """The defaults the issue and docs/design.md#config-keys fix: 3x100 sigmoid, batch 60, custom BN, auto device."""
    cfg = to_config(compose_config())
    assert cfg.model.widths == [100, 100, 100]
    assert cfg.model.activation == "sigmoid"
    assert cfg.train.batch_size == 60
    assert cfg.norm.name == "custom"
    assert cfg.device == "auto" and cfg.threads == "auto"
    assert cfg.train.resume == "auto"


def test_data_root_defaults_to_project_data_and_env_overrides(monkeypatch, tmp_path):
    """data.root is <project>/data unless BNEXP_DATA is set."""
    from bnexp.config import PROJECT_ROOT

    monkeypatch.delenv("BNEXP_DATA", raising=False)
    assert compose_config().data.root == f"{PROJECT_ROOT}/data"
    monkeypatch.setenv("BNEXP_DATA", str(tmp_path))
    assert compose_config().data.root == str(tmp_path)


BAD_VALUES = [
    ("optim.lr=-1", "optim.lr=-1.0", "finite number > 0"),
    ("optim.lr=0", "optim.lr=0.0", "finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf", "finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan", "finite number > 0"),
    ("optim.momentum=1.5", "optim.momentum=1.5", "[0, 1)"),
    ("optim.name=rmsprop", "optim.name='rmsprop'", "'sgd', the name of its group"),
    ("train.steps=0", "train.steps=0", ">= 1"),
    ("train.batch_size=1", "train.batch_size=1", ">= 2"),
    ("model.widths=[]", "model.widths=[]", "non-empty"),
    ("model.widths=[100,0]", "model.widths=[100, 0]", ">= 1"),
    ("model.activation=gelu", "model.activation='gelu'", "sigmoid, relu, tanh"),
    ("model.init_std=0", "model.init_std=0.0", "finite number > 0"),
    ("train.eval_every=0", "train.eval_every=0", ">= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0", ">= 1"),
    ("train.resume=maybe", "train.resume='maybe'", "auto, never"),
    ("device=tpu", "device='tpu'", "auto, cpu, cuda"),
    ("threads=0", "threads='0'", "'auto' or an integer >= 1"),
    ("norm.name=weight", "norm.name='weight'", "none, custom, native, custom_noisy, layer, group, batch_renorm"),
    ("norm=group norm.groups=3", "norm.groups=3", "a divisor of every hidden width (model.widths=[100, 100, 100])"),
    ("norm.groups=0", "norm.groups=0", "an integer >= 1"),
    ("norm.r_max=0.5", "norm.r_max=0.5", "a finite number >= 1"),
    ("norm.d_max=-1", "norm.d_max=-1.0", "a finite number >= 0"),
    ("norm.hold_steps=-1", "norm.hold_steps=-1", "an integer >= 0"),
    ("norm=batch_renorm train.batch_size=1", "train.batch_size=1", ">= 2"),
]


@pytest.mark.parametrize("override,named,allowed", BAD_VALUES)
def test_bad_values_are_refused_with_key_value_and_allowed(override, named, allowed):
    """validate() names the key, the value given and what is allowed, in one line."""
    with pytest.raises(ConfigError) as err:
        to_config(compose_config(override.split()))
    message = str(err.value)
    assert named in message and allowed in message and "\n" not in message


@pytest.mark.parametrize("norm", ["none", "layer", "group"])
def test_batch_size_one_is_fine_without_batch_statistics(norm):
    """Only the norms that normalize by the batch need two samples per batch."""
    assert to_config(compose_config([f"norm={norm}", "train.batch_size=1"])).train.batch_size == 1


def test_flatten_gives_dotted_scalar_keys():
    """The flattened config (summary.json, hparams) has dotted keys and scalar values."""
    flat = flatten(to_config(compose_config(["norm=native", "optim.lr=0.3"])))
    assert flat["norm.name"] == "native" and flat["optim.lr"] == 0.3
    assert flat["model.widths"] == "[100, 100, 100]"
    assert all(isinstance(v, (str, int, float, bool)) or v is None for v in flat.values())


@pytest.mark.parametrize("args,expected", [
    (["optim.lr=-1"], "optim.lr=-1.0 is not allowed: a finite number > 0"),
    (["norm=bogus"], "Could not find 'norm/bogus'"),
    (["seed=abc"], "seed"),
    (["train.bogus=1"], "bogus"),
    (["device=cuda"], "device='cuda'"),
])
def test_cli_refuses_bad_input_without_traceback(tmp_path, args, expected):
    """scripts/train.py exits non-zero with a clear message and no Python traceback, writing nothing."""
    import torch

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device=cuda is valid here")
    run_dir = tmp_path / "run"
    result = run_script(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoint.pt").exists()


def test_norm_bogus_lists_the_available_options(tmp_path):
    """Hydra's own error for an unknown group option lists none, custom, native."""
    result = run_script("norm=bogus", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    for option in ("none", "custom", "native"):
        assert option in result.stderr


def test_ioffe2015_is_the_papers_setup():
    """§4.1: 3 x 100 sigmoid, batch 60, 50,000 steps, test accuracy every 500 steps."""
    cfg = to_config(compose_config(["experiment=ioffe2015"]))
    assert (cfg.model.widths, cfg.model.activation) == ([100, 100, 100], "sigmoid")
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.eval_every) == (60, 50_000, 500)


def test_convergence_sweeps_norms_two_decades_of_lr_and_ten_seeds():
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=convergence"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params.norm.split(",")) == {"none", "custom", "native"}
    lrs = [float(v) for v in params["optim.lr"].split(",")]
    assert max(lrs) / min(lrs) >= 100 and 10.0 in lrs  # lr 10: where no-norm fails
    assert params.seed == "range(10)"  # 5 seeds left the best-vs-best intervals across 1
    assert cfg.hydra.launcher._target_.endswith("BatchedLauncher")
    assert cfg.train.eval_schedule == "log"


def sweep_params(preset: str):
    from hydra import compose, initialize_config_dir

    from bnexp.jobs.hydra_setup import register_configs
    from conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True).hydra.sweeper.params


@pytest.mark.parametrize("preset,key,grid", [
    ("placement", "optim.lr", "0.1,0.3,1.0,3.0,10.0"),
    ("depth", "optim.lr", "0.03,0.1,0.3,1.0,3.0,10.0"),
    ("santurkar", "optim.lr", "0.1,1.0,3.0,10.0"),
    ("batch_size", "lr_scale", "x0.1,x0.3,x1,x3,x10"),
    ("batch_size_data", "lr_scale", "x0.1,x0.3,x1,x3,x10"),
])
def test_study_grids_reach_one_step_past_every_published_best_rate(preset, key, grid):
    """The grids the published reports chose from (docs/results/*_report.md): a best rate at a
    grid's edge got one more rate beyond it (depth 16: 0.1 -> 0.03; santurkar: 3 -> 10; the
    batch grids: x0.3 / x3 -> x0.1 / x10), every step ~3x."""
    params = sweep_params(preset)
    assert params[key].split(",") == grid.split(",")
    assert params.seed == ("range(10)" if preset in ("placement", "santurkar") else "range(5)")


def test_optuna_preset_searches_lr_on_a_log_scale():
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=optuna_lr", "norm=native"],
                      return_hydra_config=True)
    assert cfg.name == "optuna_lr_native" and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.params["optim.lr"].startswith("tag(log, interval(")


@pytest.mark.parametrize("batch,scale", [(2, "x0.1"), (2, "x0.3"), (60, "x1"), (1024, "x3"), (1024, "x10")])
def test_batch_size_study_gives_each_batch_its_own_lr_grid(batch, scale):
    """lr_scale=xM sets lr = M x sqrt(batch / 60), so every batch size gets five rates around its own rule."""
    cfg = to_config(compose_config(["experiment=batch_size", f"train.batch_size={batch}", f"lr_scale={scale}",
                                    "data.root=/nonexistent"]))
    assert cfg.optim.lr == pytest.approx(float(scale[1:]) * math.sqrt(batch / 60), rel=1e-5)
    assert cfg.train.steps == 1000


@pytest.mark.parametrize("batch,steps", [(2, 50_000), (60, 1667), (1024, 98)])
def test_equal_data_twin_shows_every_batch_size_the_same_images(batch, steps):
    cfg = to_config(compose_config(["experiment=batch_size_data", f"train.batch_size={batch}",
                                    "data.root=/nonexistent"]))
    assert cfg.name == "batch_size_data"
    assert cfg.train.steps == steps and (steps - 1) * batch < 100_000 <= steps * batch
    assert cfg.train.eval_every == -(-steps // 40) and cfg.train.eval_schedule == "log"
    assert (cfg.norm.hold_steps, cfg.norm.warmup_steps) == (-(-steps // 20), -(-steps // 5))
    assert cfg.optim.lr == pytest.approx(math.sqrt(batch / 60), rel=1e-5)  # the study's lr rule, inherited
