"""Where a run executes: the torch device and the number of CPU threads.

Threads on a shared machine. Every matmul and large op of a training step is an OpenMP
parallel region that ends only when each of its threads has done its part. When another
process holds one of the cores, the thread waiting for it is descheduled and the region waits
for a scheduler slice (milliseconds), dozens of times a step: beside one busy process a 2-thread
run of the default MLP kept only a small part of its speed (measured:
docs/results/measurements.md#threads), while one thread keeps its whole core. A second
thread is worth that risk only when each op has enough work to share, so `threads=auto` takes
one thread below a crossover of work per op measured by `scripts/bench.py --sections threads`,
and this job's share of the cores above it. Jobs of a sweep that run at once split the cores
between them (`cores_per_job`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bnexp.config import ConfigError

# Work per op (mean multiply-adds per matmul, work_per_op) from which `threads=auto` gives a run
# more than one thread. From `python scripts/bench.py --sections threads --repeats 3` (passive
# OpenMP wait, docs/results/bench_threads.json; the figures and the machine:
# docs/results/measurements.md#threads): alone, 2 threads lose to 1 below it and win from the
# first measured shape above it on, by more the larger the shape; beside one busy process they
# never win, but above it they lose less, where below it a second thread is pure loss. So the
# crossover is the one measured alone, just under its first paying shape. The default MLP at
# batch 60 does 1.5M per op: 1 thread.
THREADS_CROSSOVER_MACS = 20_000_000
MNIST_INPUTS, MNIST_CLASSES = 784, 10


# What `device=auto` weighs when a run's steps cannot be replayed as a CUDA graph (a graphed
# step costs about one launch, so a graphed run always takes the GPU). Uncaptured, a GPU step of
# this MLP is launch-bound: 367 steps/s for one run and the same ~2.7 ms per step for a batched
# group of K (K x 367 model-steps/s up to K = 25; H200, docs/results/bench_sweep_cuda.json), while
# one CPU thread does ~12 G multiply-adds/s on it (668 steps/s x 17.9M multiply-adds per step,
# norm=none, docs/results/bench.json). Both are measurements of one machine each: the rule
# picks the CPU only where it is clearly ahead by them, and says so in the device log line.
GPU_EAGER_STEPS_PER_S = 367.0
CPU_MACS_PER_S = 12e9


def pick_device(device: str) -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is a config error.
    (A run's own choice, which also weighs its speed on each, is choose_device's.)"""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: torch sees no CUDA GPU on this machine "
                          "(use device=auto or device=cpu)")
    return torch.device(device)


@dataclass(frozen=True)
class DeviceChoice:
    """Where a run (or a group of `members` runs) trains, and why (the `device: ...` log line)."""

    device: torch.device
    why: str


def layer_macs(widths: list[int], batch_size: int, inputs: int = MNIST_INPUTS,
               classes: int = MNIST_CLASSES) -> list[int]:
    """Multiply-adds of each of the MLP's matmuls in a forward pass (batch x fan_in x fan_out)."""
    sizes = [inputs, *widths, classes]
    return [batch_size * a * b for a, b in zip(sizes[:-1], sizes[1:])]


def macs_per_step(widths: list[int], batch_size: int, inputs: int = MNIST_INPUTS,
                  classes: int = MNIST_CLASSES) -> int:
    """Multiply-adds of one training step of one MLP: its forward's matmuls, three times
    (forward, the backward's two products per layer)."""
    return 3 * sum(layer_macs(widths, batch_size, inputs, classes))


def choose_device(cfg, members: int = 1, gpu: bool | None = None) -> DeviceChoice:
    """The device of a run of `cfg` trained with members - 1 others in one group.

    device=cpu|cuda: as given. device=auto: the CPU without a GPU; with one, the GPU when the
    run's steps are replayed as CUDA graphs (bnexp/run/graphs.py) or when, uncaptured, the GPU's
    launch-bound step beats the CPU's estimated one; else the CPU, saying why. gpu: whether a
    GPU is seen (None: ask torch).
    """
    from bnexp.run.graphs import capture_blocker  # graphs -> registry -> layers: imported when used

    if cfg.device != "auto":
        return DeviceChoice(pick_device(cfg.device), f"device={cfg.device} as given")
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        return DeviceChoice(torch.device("cpu"), "auto: torch sees no CUDA GPU")
    cuda = torch.device("cuda")
    blocker = capture_blocker(cfg, cuda)
    if blocker is None:
        return DeviceChoice(cuda, "auto: a GPU, training steps replayed as CUDA graphs")
    gpu_rate = GPU_EAGER_STEPS_PER_S * members
    cpu_rate = CPU_MACS_PER_S / macs_per_step(cfg.model.widths, cfg.train.batch_size)
    if cpu_rate > gpu_rate:
        return DeviceChoice(torch.device("cpu"), (
            f"auto: a GPU is seen, but this run's steps cannot be captured ({blocker}) and, launched one "
            f"kernel at a time, the GPU would be slower for it (~{gpu_rate:.0f} vs ~{cpu_rate:.0f} model-steps/s "
            f"on one CPU thread, estimated: bnexp/run/runtime.py); device=cuda forces the GPU"))
    return DeviceChoice(cuda, f"auto: a GPU; steps not captured ({blocker}), still faster than the CPU "
                              f"(~{gpu_rate:.0f} vs ~{cpu_rate:.0f} model-steps/s, estimated)")


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cores_per_job(concurrent_jobs: int, cores: int | None = None) -> int:
    """The sweep rule: jobs running at the same time split the cores, n_jobs x threads <= cores.

    At least one each: with more jobs than cores the jobs oversubscribe, never their threads.
    """
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, concurrent_jobs))


def work_per_op(widths: list[int], batch_size: int, inputs: int = MNIST_INPUTS,
                classes: int = MNIST_CLASSES) -> int:
    """Mean multiply-adds of one of the MLP's matmuls in a forward pass (batch x fan_in x fan_out).

    What one parallel region has to share between threads; the backward's matmuls are the
    same sizes transposed.
    """
    macs = layer_macs(widths, batch_size, inputs, classes)
    return sum(macs) // len(macs)


@dataclass(frozen=True)
class ThreadChoice:
    """How many torch threads a job uses, and why (the `torch threads: N (why)` log line)."""

    threads: int
    why: str


def choose_threads(threads: str, work: int, job_cores: int | None = None, launcher: str = "") -> ThreadChoice:
    """torch threads for one job, and why.

    threads: the config value, `auto` or an integer (used as given). work: work_per_op of the
    job's model. job_cores: the cores its launcher leaves it (None: every core this process may
    use), and `launcher` says why (e.g. "joblib runs 2 jobs at once on 2 cores").
    """
    share = available_cores() if job_cores is None else job_cores
    cores = f"{share} core(s) per job: {launcher}" if launcher else f"{share} core(s) on this machine"
    if threads != "auto":
        n = int(threads)
        over = f"; more than {cores}" if n > share else ""
        return ThreadChoice(n, f"threads={n} as given{over}" + (f"; {wait_policy()}" if n > 1 else ""))
    macs = f"{work / 1e6:.1f}M multiply-adds per op"
    crossover = f"crossover {THREADS_CROSSOVER_MACS / 1e6:g}M"
    if work < THREADS_CROSSOVER_MACS or share == 1:
        below = f"{macs} < {crossover}" if work < THREADS_CROSSOVER_MACS else f"{macs} >= {crossover}"
        return ThreadChoice(1, f"auto: 1, {below}; {cores}")
    return ThreadChoice(share, f"auto: {share}, {macs} >= {crossover}; {cores}; {wait_policy()}")


def wait_policy() -> str:
    """How idle OpenMP threads wait, as this process's environment says (OpenMP reads it once,
    when torch loads it; scripts/train.py chooses passive unless you set one)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    if "GOMP_SPINCOUNT" in os.environ:
        return f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    return "OMP_WAIT_POLICY unset (threads spin before they sleep)"


def set_threads(n: int) -> None:
    """Set torch's intra-op threads (float reductions depend on it: keep it fixed for exact repeats)."""
    torch.set_num_threads(n)
