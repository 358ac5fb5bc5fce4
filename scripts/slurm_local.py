"""Start or stop a one-node SLURM cluster whose config and state live in one directory.

    sudo apt-get install slurm-wlm munge                      # once
    python scripts/slurm_local.py start /tmp/bnexp-slurm      # prints the line to export
    export SLURM_CONF=/tmp/bnexp-slurm/slurm.conf
    python scripts/train.py -m hydra/launcher=slurm experiment=smoke norm=none,custom
    python scripts/slurm_local.py stop /tmp/bnexp-slurm       # cancels jobs, ends the daemons

Run as root (slurmd starts jobs as their owner). Code: bnexp/jobs/local_slurm.py.
"""

import argparse
import sys
from pathlib import Path

from bnexp.jobs.local_slurm import LocalSlurm, LocalSlurmError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("dir", type=Path, help="where slurm.conf, state and logs go (created)")
    args = parser.parse_args()
    cluster = LocalSlurm(args.dir.resolve())
    if args.action == "stop":
        cluster.stop()
        print(f"stopped the cluster in {cluster.root}")
        return 0
    try:
        cluster.start()
    except LocalSlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"one-node cluster up (partition debug); point SLURM commands and bnexp at it with:\n"
          f"  export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
