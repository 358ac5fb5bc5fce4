"""bnexp's configs with Hydra: the schemas in its ConfigStore, bnexp's resolvers, the batched
launcher, and `compose` for tests and benchmarks. Kept out of bnexp/config.py, which is the
schema and its checks only."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from bnexp.config import PROJECT_ROOT, AdamConfig, Config, NormConfig, SGDConfig


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore and the `bnexp.root`, `bnexp.jobs.run_name` resolvers.

    conf/config.yaml names `bnexp_schema` first in its defaults list; conf/optim/*.yaml name
    `sgd_schema` / `adam_schema`. Safe to call more than once.
    """
    from hydra.core.config_store import ConfigStore

    from hydra_plugins.bnexp_batched_launcher.batched_launcher import register

    register()  # hydra/launcher=batched, also where Hydra's plugin scan cannot see it
    cs = ConfigStore.instance()
    cs.store(name="bnexp_schema", node=Config)
    cs.store(group="norm", name="norm_schema", node=NormConfig)
    cs.store(group="optim", name="sgd_schema", node=SGDConfig)
    cs.store(group="optim", name="adam_schema", node=AdamConfig)
    if not OmegaConf.has_resolver("bnexp.root"):
        OmegaConf.register_new_resolver("bnexp.root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("bnexp.jobs.run_name"):
        from bnexp.jobs.run_name import run_name  # hydra.run.dir: <stamp>_<overrides> (bnexp/jobs/run_name.py)
        OmegaConf.register_new_resolver("bnexp.jobs.run_name", run_name)
    if not OmegaConf.has_resolver("bnexp.sqrt_scaled"):
        OmegaConf.register_new_resolver("bnexp.sqrt_scaled", sqrt_scaled)
    if not OmegaConf.has_resolver("bnexp.ceil_div"):
        OmegaConf.register_new_resolver("bnexp.ceil_div", ceil_div)


def sqrt_scaled(base: float, batch_size: int, reference: int) -> float:
    """base * sqrt(batch_size / reference), rounded to 6 significant digits: the square-root lr rule
    of conf/experiment/batch_size.yaml (`${bnexp.sqrt_scaled:1.0,${train.batch_size},60}`)."""
    return float(f"{float(base) * math.sqrt(int(batch_size) / int(reference)):.6g}")


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers: the steps that show `a` images in batches of `b`
    (conf/experiment/batch_size_data.yaml: `${bnexp.ceil_div:100000,${train.batch_size}}`)."""
    return -(-int(a) // int(b))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/config.yaml with overrides, composed as scripts/train.py composes it but without a
    run dir: for tests, benchmarks and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
