"""Config schema and value checks (Hydra registration: bnexp/jobs/hydra_setup.py).

The dataclasses below are registered in Hydra's ConfigStore, so a wrong *type* (``seed=abc``)
fails when Hydra merges the overrides. Wrong *values* (``optim.lr=-1``) fail in `validate`,
before any data is loaded or any file is written, with one line that names the key, the value
and what is allowed.

Each value is checked in one place. Two limits depend on the data, not on the config, and are
checked where the number of training images is known, right after the IDX files are read and
before a model is built: `data.val_size < training images` (bnexp.run.data.load_mnist) and
`train.batch_size <= images left for training` (bnexp.run.member.load_data, when the run loads its data).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

POSITIONS = ("before", "after")  # norm.position: where the norm sits relative to the nonlinearity
ACTIVATIONS = ("sigmoid", "relu", "tanh")
DEVICES = ("auto", "cpu", "cuda")
RESUME_MODES = ("auto", "never")
EVAL_SCHEDULES = ("linear", "log")  # bnexp/run/schedule.py
GRAPH_MODES = ("auto", "on", "off")  # train.cuda_graphs: bnexp/run/graphs.py
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config value outside what is allowed; the message is one line for the user."""


@dataclass
class NormConfig:
    name: str = "custom"
    compile: bool = False
    position: str = "before"  # before | after the nonlinearity (bnexp.nn.model.HiddenLayer)
    # norm=custom_noisy only (bnexp/nn/noise.py has the distribution); ignored by the other norms
    noise_shift: float = 1.0
    noise_scale: float = 2.0
    noise_jitter: float = 0.1
    # norm=group only: groups of channels per hidden layer (a divisor of every width)
    groups: int = 4
    # norm=batch_renorm only (bnexp/nn/batch_renorm.py): the limits of r and d, reached after
    # hold_steps steps of plain batch norm (r_max 1, d_max 0) and warmup_steps of linear relaxing
    r_max: float = 3.0
    d_max: float = 5.0
    hold_steps: int = 1000
    warmup_steps: int = 4000


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 1e-3


@dataclass
class ModelConfig:
    widths: list[int] = field(default_factory=lambda: [100, 100, 100])
    activation: str = "sigmoid"
    init_std: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 60
    eval_every: int = 500
    eval_schedule: str = "linear"  # linear: every eval_every steps | log: as many, evenly in log(step) (bnexp/run/schedule.py)
    log_every: int = 1
    checkpoint_every: int = 1000
    test_every: int = 0  # 0: the test set once, at the end; k: also every k steps (a multiple of eval_every)
    resume: str = "auto"
    tensorboard: bool = True
    cuda_graphs: str = "auto"  # auto | on | off: training steps replayed as CUDA graphs on a GPU (bnexp/run/graphs.py)


@dataclass
class DataConfig:
    root: str = MISSING
    val_size: int = 10_000
    normalize: bool = True
    verify: bool = True


@dataclass
class ProbeConfig:
    """Measurements of *why* batch norm helps (bnexp/run/probes.py); all off by default."""

    every: int = 0  # landscape + ICS probes every k steps; 0 = off
    multiples: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # eta / lr
    ics: bool = True  # with probes on, also internal covariate shift (Santurkar Def. 2.1)
    train_mode_acc: bool = False  # test accuracy in training mode at eval points (test/acc_train_mode)


@dataclass
class Config:
    name: str = "default"
    norm: NormConfig = field(default_factory=NormConfig)
    optim: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    device: str = "auto"
    threads: str = "auto"


def _registry() -> dict:
    from bnexp.nn.registry import NORMS  # the variants live with their layers, not in the schema

    return NORMS


def norm_names() -> tuple[str, ...]:
    """The values `norm` may take, in the registry's order."""
    return tuple(_registry())


def to_config(cfg: DictConfig) -> Config:
    """Turn Hydra's composed DictConfig into a validated, plain `Config` object."""
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Unless ok, raise the one line `key=value is not allowed: allowed`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def validate(cfg: Config) -> None:
    """Check every value that the schema's types cannot; raise ConfigError on the first bad one."""
    norms = norm_names()
    _require(cfg.norm.name in norms, "norm.name", cfg.norm.name, f"one of {', '.join(norms)}")
    _validate_norm_extras(cfg.norm)
    _validate_optim(cfg.optim)
    m = cfg.model
    _require(len(m.widths) > 0, "model.widths", m.widths, "a non-empty list of hidden sizes")
    _require(all(w > 0 for w in m.widths), "model.widths", m.widths, "every hidden size must be >= 1")
    _require(m.activation in ACTIVATIONS, "model.activation", m.activation, f"one of {', '.join(ACTIVATIONS)}")
    _require(_positive_finite(m.init_std), "model.init_std", m.init_std, "a finite number > 0")
    t = cfg.train
    _require(t.steps >= 1, "train.steps", t.steps, "an integer >= 1")
    min_batch = 2 if _registry()[cfg.norm.name].batch_stats else 1
    _require(t.batch_size >= min_batch, "train.batch_size", t.batch_size,
             f"an integer >= {min_batch} (batch norm needs 2 samples to estimate a variance)"
             if min_batch == 2 else "an integer >= 1")
    if cfg.norm.name == "group":
        _require(all(w % cfg.norm.groups == 0 for w in m.widths), "norm.groups", cfg.norm.groups,
                 f"a divisor of every hidden width (model.widths={m.widths})")
    for key in ("eval_every", "log_every", "checkpoint_every"):
        _require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    _require(t.test_every >= 0 and t.test_every % t.eval_every == 0, "train.test_every", t.test_every,
             f"0 (the test set only at the end) or a multiple of train.eval_every={t.eval_every}")
    _require(t.eval_schedule in EVAL_SCHEDULES, "train.eval_schedule", t.eval_schedule,
             f"one of {', '.join(EVAL_SCHEDULES)}")
    _require(t.resume in RESUME_MODES, "train.resume", t.resume, f"one of {', '.join(RESUME_MODES)}")
    _require(t.cuda_graphs in GRAPH_MODES, "train.cuda_graphs", t.cuda_graphs, f"one of {', '.join(GRAPH_MODES)}")
    _require(cfg.device in DEVICES, "device", cfg.device, f"one of {', '.join(DEVICES)}")
    _require(cfg.threads == "auto" or (str(cfg.threads).isdigit() and int(cfg.threads) >= 1),
             "threads", cfg.threads, "'auto' or an integer >= 1")
    _validate_probe(cfg.probe)
    _require(cfg.probe.every == 0 or t.tensorboard, "probe.every", cfg.probe.every,
             "0 with train.tensorboard=false (probe values go to TensorBoard only)")


def _validate_norm_extras(norm: NormConfig) -> None:
    """norm.position and the variants' own keys: noise (bnexp/nn/noise.py), groups, renorm limits."""
    _require(norm.position in POSITIONS, "norm.position", norm.position, f"one of {', '.join(POSITIONS)}")
    _require(not norm.compile or _registry()[norm.name].compile != "refused", "norm.compile", norm.compile,
             f"false with norm={norm.name} (it runs our layer eagerly)")
    _require(isinstance(norm.noise_shift, (int, float)) and math.isfinite(norm.noise_shift)
             and norm.noise_shift >= 0, "norm.noise_shift", norm.noise_shift, "a finite number >= 0")
    _require(isinstance(norm.noise_scale, (int, float)) and math.isfinite(norm.noise_scale)
             and norm.noise_scale >= 1, "norm.noise_scale", norm.noise_scale, "a finite number >= 1")
    _require(isinstance(norm.noise_jitter, (int, float)) and math.isfinite(norm.noise_jitter)
             and norm.noise_jitter >= 0, "norm.noise_jitter", norm.noise_jitter, "a finite number >= 0")
    _require(norm.groups >= 1, "norm.groups", norm.groups, "an integer >= 1 (norm=group: a divisor of every width)")
    _require(isinstance(norm.r_max, (int, float)) and math.isfinite(norm.r_max) and norm.r_max >= 1,
             "norm.r_max", norm.r_max, "a finite number >= 1")
    _require(isinstance(norm.d_max, (int, float)) and math.isfinite(norm.d_max) and norm.d_max >= 0,
             "norm.d_max", norm.d_max, "a finite number >= 0")
    for key in ("hold_steps", "warmup_steps"):
        _require(getattr(norm, key) >= 0, f"norm.{key}", getattr(norm, key), "an integer >= 0")


def _validate_probe(probe: ProbeConfig) -> None:
    _require(probe.every >= 0, "probe.every", probe.every, "an integer >= 0 (0 = no probes)")
    _require(len(probe.multiples) > 0 and all(_positive_finite(m) for m in probe.multiples),
             "probe.multiples", probe.multiples, "a non-empty list of finite numbers > 0 (step sizes / lr)")


def _validate_optim(optim: SGDConfig | AdamConfig) -> None:
    group = "sgd" if isinstance(optim, SGDConfig) else "adam"
    _require(optim.name == group, "optim.name", optim.name,
             f"{group!r}, the name of its group (pick the optimizer with optim=sgd or optim=adam)")
    _require(_positive_finite(optim.lr), "optim.lr", optim.lr, "a finite number > 0")
    if isinstance(optim, SGDConfig):
        _require(0 <= optim.momentum < 1, "optim.momentum", optim.momentum, "a number in [0, 1)")


def resolve_data_root(root: str) -> Path:
    """The data root as an absolute path; relative paths are taken from the current directory."""
    return Path(os.path.expanduser(root)).resolve()


def flatten(cfg: Config | DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to {"a.b": value}; lists become strings (TensorBoard hparams need scalars).

    A Config goes through dataclasses.asdict, not OmegaConf.structured (hundreds of times slower,
    docs/results/measurements.md#config-flatten; paid for
    every job of a batched sweep and twice for every member of a group)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    elif not isinstance(cfg, dict):
        cfg = asdict(cfg)
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        else:
            flat[name] = value
    return flat
