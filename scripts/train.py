"""Train one MLP on MNIST, or a sweep of them.

    python scripts/train.py norm=custom                       # our batch norm (default; time: see below)
    python scripts/train.py norm=none optim.lr=0.1 train.steps=2000
    python scripts/train.py -m norm=none,custom,native seed=0,1,2
    python scripts/train.py experiment=smoke                  # seconds, a quick check
    python scripts/train.py probe.every=100 norm=custom_noisy # Santurkar's probes, BN with shifting noise
    python scripts/train.py -m experiment=santurkar           # also: depth, batch_size, placement (README)
    tensorboard --logdir outputs

Configs: conf/ (see conf/config.yaml for every knob). Code: bnexp/cli.py -> bnexp/run/loop.py.
How long the default run takes: docs/results/measurements.md#default-run.
"""

import os

# torch's OpenMP threads spin while they wait for work; beside another busy process that spinning
# takes the core the descheduled partner thread needs (scripts/bench.py --sections threads). Only
# read when torch loads OpenMP, so it is chosen here, before any import of torch. Yours wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import hydra  # noqa: E402

from bnexp import cli  # noqa: E402
from bnexp.jobs.hydra_setup import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> float:
    return cli.main(cfg)


if __name__ == "__main__":
    main()
