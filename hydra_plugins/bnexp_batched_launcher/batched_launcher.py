"""The Launcher that Hydra instantiates for `hydra/launcher=batched` (work in _core.py)."""

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class BatchedLauncher(Launcher):
    """Groups a sweep's compatible bnexp jobs and trains each group as one vectorized model.

    Every job still gets its own dir, `.hydra/`, log, summary.json, TensorBoard events,
    checkpoint and model.pt, and returns its own result (the final val accuracy), so sweepers
    (the basic one, Optuna) work as with any launcher. See README.md, "Many runs in one process".
    """

    def __init__(self, max_batch: int = 25, n_jobs: int = 1, executor: str = "none",
                 submitit_folder: str = ".submitit/%j", submitit: Any = None, max_num_timeout: int = 3):
        self.max_batch, self.n_jobs, self.executor = max_batch, n_jobs, executor
        self.submitit_folder, self.max_num_timeout = submitit_folder, max_num_timeout
        self.submitit = OmegaConf.to_container(submitit, resolve=True) if OmegaConf.is_config(submitit) \
            else dict(submitit or {})
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        from . import _core

        _core.start_early(self)  # the workers' imports, beside Hydra's validation of every job

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _core  # imported on use: Hydra imports this module on every start

        return _core.launch(self, job_overrides, initial_job_idx)


def register() -> None:
    """Register the launcher and its config with Hydra by hand (bnexp.jobs.hydra_setup.register_configs).

    Hydra's plugin scan walks the `hydra_plugins` namespace on sys.path, which finds this package
    when it is installed or on PYTHONPATH, but not inside a setuptools editable install
    (`pip install -e .` maps packages through an import hook that the walk does not see).
    """
    import importlib

    from hydra.core.plugins import Plugins

    importlib.import_module(f"{__package__}.config")  # stores hydra/launcher=batched, hydra/sweeper=batched_basic
    Plugins.instance().register(BatchedLauncher)
    from .sweeper import BatchedBasicSweeper

    Plugins.instance().register(BatchedBasicSweeper)
