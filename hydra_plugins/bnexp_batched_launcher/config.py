"""`hydra/launcher=batched`: the launcher's settings, registered with Hydra's ConfigStore.

Hydra imports this module when it scans the `hydra_plugins` namespace for plugins.
"""

from dataclasses import dataclass, field
from typing import Any, Dict

from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf
from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.bnexp_batched_launcher.batched_launcher.BatchedLauncher"
    # runs per group: more amortizes more per-op overhead; 25 fills 2 CPU cores (scripts/bench.py --sections sweep)
    max_batch: int = 25
    # groups at once, each in a process of its own (-1: one per core); 1: one after another in this process
    n_jobs: int = 1
    # none: groups run on this machine | local: each group a submitit job here | slurm: each a SLURM job
    executor: str = "none"
    # where submitit keeps each group's pickles and logs (executor=local|slurm)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # submitit parameters of each group's job; generic ones, or slurm_* (slurm_partition, slurm_account, ...)
    submitit: Dict[str, Any] = field(default_factory=lambda: {
        "timeout_min": 60,      # a group of 25 convergence runs takes minutes; hours for long runs
        "cpus_per_task": 2,     # threads=auto gives the group exactly these cores
        "gpus_per_node": 0,     # 1: the group runs on a GPU (device=auto takes it)
        "mem_gb": 8,            # MNIST once per group (~0.2 GB) + K small models + torch
        "slurm_partition": "${oc.env:BNEXP_SLURM_PARTITION,null}",  # null: the cluster's default
        "slurm_account": "${oc.env:BNEXP_SLURM_ACCOUNT,null}",      # many clusters require one
    })
    # SLURM: times a group that hits its time limit is requeued; it resumes from its checkpoints
    max_num_timeout: int = 3


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf,
                             provider="bnexp")


@dataclass
class BatchedBasicSweeperConf(BasicSweeperConf):
    """Hydra's basic sweeper's settings, for `hydra/sweeper=batched_basic` (sweeper.py says what differs)."""

    _target_: str = "hydra_plugins.bnexp_batched_launcher.sweeper.BatchedBasicSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="batched_basic", node=BatchedBasicSweeperConf,
                             provider="bnexp")
