"""What `hydra/launcher=batched` does with a sweep's jobs, in three steps.

1. Prepare: every job goes through Hydra's own `run_job`, as with any launcher, with a task
   that only validates its config and notes its run dir: Hydra makes the dir, `.hydra/` and
   the job's log exactly as for a solo job. A bad value fails here, before any training.
2. Train: jobs whose configs differ only in what a member may keep for itself
   (bnexp.jobs.groups.MEMBER_KEYS) form groups of at most `max_batch`; each group trains as one
   vectorized model (bnexp.run.loop.train_group) in this process, in worker processes
   (`n_jobs`), or as submitit jobs (`executor=local|slurm`).
3. Report: every job goes through `run_job` again, now with the real callbacks, with a task
   that logs the job's one `done ...` line and returns its sweep objective, as bnexp.cli does.

A signal (Ctrl-C, SIGTERM) makes every running group checkpoint its members; the launcher
then prints the command that resumes the sweep (the same command with this sweep's dir) and
exits 128 + the signal number. Run again, completed runs return their results untouched.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# The one private Hydra API here: an empty Callbacks for the prepare step's run_job, so that
# callbacks see each job once (in the report step, with its result). Hydra 1.3 has no public
# constructor for a HydraContext without callbacks; hydra-core is pinned <1.4 (pyproject.toml).
from hydra._internal.callbacks import Callbacks
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from bnexp.jobs import lifecycle
from bnexp.config import Config, ConfigError, to_config
from bnexp.jobs.groups import make_groups
from bnexp.jobs.workers import GroupJob, outcomes_path, read_outcomes, worker_main, write_request
from bnexp.run.loop import USER_ERRORS, MemberSpec, train_group
from bnexp.run.member import Outcome
from bnexp.run.runtime import ThreadChoice, available_cores, cores_per_job
from bnexp.run.signals import StopFlag

log = logging.getLogger(__name__)

EXECUTORS = ("none", "local", "slurm")
POLL_S = 0.2  # how often the launcher looks at its worker processes


@dataclass
class Job:
    """One job of the sweep: its index, its Hydra config and what its group needs."""

    idx: int
    config: DictConfig
    spec: MemberSpec


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Prepare, group, train and report the jobs of one batch of the sweep; one JobReturn each."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    try:
        check_settings(launcher)
    except ConfigError as exc:
        lifecycle.fail(str(exc))
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        jobs = prepare_all(launcher, [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)])
        check_distinct_dirs(jobs)
        groups = make_groups([job.spec.cfg for job in jobs], launcher.max_batch, _processes(launcher))
    except ConfigError as exc:
        lifecycle.fail(str(exc))
    returns: dict[int, JobReturn] = {}
    finished: dict[int, Outcome] = {}
    stop = StopFlag()
    for group, outcomes, threads in train_groups(launcher, jobs, groups, sweep_dir, stop):
        for i, outcome in zip(group, outcomes):
            finished[i] = outcome
            if outcome.error is None and outcome.signum is None:
                returns[i] = report(launcher, jobs[i], outcome, len(group), threads)
    stop_if_unfinished(jobs, finished, sweep_dir, stop.signum)
    return [returns[i] for i in range(len(jobs))]


# -- 1. prepare -----------------------------------------------------------------------------


_PREPARING = None  # the launcher, for prepare's forked processes (they inherit it; no pickling)


def prepare_all(launcher, jobs: list[tuple[int, list[str]]]) -> list[Job]:
    """`prepare` for every (index, overrides), in job order; a bad value raises ConfigError.

    Hydra composes each job's config anew (re-reading every YAML file): a quarter of a second a
    job, many seconds for the 75 jobs of experiment=convergence, before any group could start
    (docs/results/measurements.md#batched-launcher-start-up).
    When the groups may run in worker processes (n_jobs > 1), the jobs are prepared in one
    forked process per core (no group of this batch has started yet). A fork is safe even where
    this process trained before (a batch of one group runs here): the children only compose and
    validate configs, touching neither OpenMP nor CUDA. Each child makes its jobs' dirs and
    logs; the configs come back pickled.
    """
    global _PREPARING
    for idx, overrides in jobs:
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    processes = min(available_cores(), len(jobs)) if _processes(launcher) > 1 else 1
    if processes == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [prepare(launcher, idx, overrides) for idx, overrides in jobs]
    _PREPARING = launcher
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            prepared = pool.starmap(_prepare_forked, jobs)
    finally:
        _PREPARING = None
    for job in prepared:
        if isinstance(job, ConfigError):
            raise job  # the first bad job in sweep order, as when preparing one after another
    return prepared


def _prepare_forked(idx: int, overrides: list[str]) -> Job | ConfigError:
    """`prepare` in a forked process; a user error comes back as a value, for prepare_all to
    raise in job order."""
    try:
        return prepare(_PREPARING, idx, overrides)
    except ConfigError as exc:
        return exc


def prepare(launcher, idx: int, overrides: Sequence[str]) -> Job:
    """Hydra's run_job for one job with a task that validates its config and notes its run dir."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = idx
        config.hydra.job.num = idx
    seen = {}

    def note(task_cfg: DictConfig) -> None:
        try:
            seen["cfg"] = to_config(task_cfg)
        except USER_ERRORS as exc:  # noted, not raised: Hydra would add a line of its own
            seen["error"] = str(exc)
            return
        hydra = HydraConfig.get()
        seen["run_dir"] = Path(hydra.runtime.output_dir)
        log_file = OmegaConf.select(hydra, "job_logging.handlers.file.filename", default=None)
        seen["log_file"] = None if log_file is None else Path(log_file)

    # callbacks see each job once, in step 3, when it has its result
    quiet = HydraContext(config_loader=launcher.hydra_context.config_loader, callbacks=Callbacks())
    ret = run_job(hydra_context=quiet, task_function=note, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    # back to the sweep's console logging: this job's log file must not collect other lines
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    ret.return_value  # noqa: B018 -- re-raises what the task raised (a bug, not a user error)
    if "error" in seen:
        raise ConfigError(seen["error"])
    return Job(idx, config, MemberSpec(seen["cfg"], seen["run_dir"], seen["log_file"]))


def check_settings(launcher) -> None:
    if launcher.executor not in EXECUTORS:
        raise ConfigError(f"hydra.launcher.executor={launcher.executor!r} is not allowed: "
                          f"one of {', '.join(EXECUTORS)}")
    if not (launcher.n_jobs == -1 or launcher.n_jobs >= 1):
        raise ConfigError(f"hydra.launcher.n_jobs={launcher.n_jobs!r} is not allowed: "
                          "an integer >= 1, or -1 for one group process per core")


def check_distinct_dirs(jobs: list[Job]) -> None:
    """Two jobs in one dir would train into each other's files: refuse, naming the dir."""
    seen: dict[Path, int] = {}
    for job in jobs:
        other = seen.setdefault(job.spec.run_dir, job.idx)
        if other != job.idx:
            raise ConfigError(f"jobs #{other} and #{job.idx} of this sweep have the same run dir "
                              f"{job.spec.run_dir}: give them different overrides or hydra.sweep.subdir")


# -- 2. train -------------------------------------------------------------------------------


def train_groups(launcher, jobs: list[Job], groups: list[list[int]], sweep_dir: Path,
                 stop: StopFlag) -> Iterator[tuple[list[int], list[Outcome], ThreadChoice]]:
    """Train every group where the settings say; yield (job indices, outcomes, thread choice) as
    groups finish. `stop` catches SIGINT/SIGTERM while no group holds them (between groups)."""
    parallel = _parallel(launcher, len(groups))
    choices = [_threads(launcher, [jobs[i].spec.cfg for i in group], parallel) for group in groups]
    threads = [choice.threads for choice in choices]
    sizes = ", ".join(str(len(g)) for g in groups)
    where = {"none": f"{parallel} at a time " + ("in this process" if parallel == 1 else "in worker processes"),
             "local": "as submitit jobs on this machine", "slurm": "as SLURM jobs (submitit)"}[launcher.executor]
    log.info("batched launcher: %d jobs in %d group%s (%s; max_batch %d), %s, torch threads %s",
             len(jobs), len(groups), "" if len(groups) == 1 else "s", sizes, launcher.max_batch, where,
             "/".join(sorted({str(t) for t in threads})))
    for why in sorted({choice.why for choice in choices}):  # as bnexp.cli.main logs a solo job's
        log.info("torch threads: %d (%s)", next(c.threads for c in choices if c.why == why), why)
    specs = [[jobs[i].spec for i in group] for group in groups]
    with stop:
        if launcher.executor != "none":
            results = _submitit(launcher, specs, threads)
        elif parallel == 1:
            results = _in_this_process(specs, threads, stop)
        else:
            results = _in_workers(specs, threads, parallel, sweep_dir / ".batched", stop)
        for g, outcomes in results:
            yield groups[g], outcomes, choices[g]


def _processes(launcher) -> int:
    """Group processes that run at once on this machine, for balancing group sizes (make_groups);
    1 for submitit executors, whose jobs the scheduler places."""
    return _n_jobs(launcher) if launcher.executor == "none" else 1


def _parallel(launcher, n_groups: int) -> int:
    """Group processes at once on this machine (executor=none)."""
    return max(1, min(_n_jobs(launcher), n_groups))


def _n_jobs(launcher) -> int:
    """hydra.launcher.n_jobs with -1 read as one per core."""
    return available_cores() if launcher.n_jobs == -1 else launcher.n_jobs


def _threads(launcher, cfgs: list[Config], parallel: int) -> ThreadChoice:
    """torch threads of a group's process, chosen as for a solo job (bnexp.jobs.lifecycle.threads):
    the processes that run at once share the cores (n_jobs x threads <= cores), or the group
    takes its job's cpus_per_task."""
    if launcher.executor != "none":
        cores = launcher.submitit.get("cpus_per_task") or 1
        why = f"submitit cpus_per_task={cores}"
    else:
        cores = cores_per_job(parallel)
        why = f"batched launcher runs {parallel} group{'s' if parallel > 1 else ''} at once on {available_cores()} cores"
    return lifecycle.threads(cfgs[0], len(cfgs), cores, why)


def _in_this_process(specs, threads, stop: StopFlag) -> Iterator[tuple[int, list[Outcome]]]:
    """One group after another; after a signal no further group starts. (A group holds the
    signals itself while it trains, so `stop` sees only those that come between groups.)"""
    for g, (group, n) in enumerate(zip(specs, threads)):
        if stop.signum is not None:
            return
        outcomes = train_group(group, n)
        yield g, outcomes
        if any(o.signum is not None for o in outcomes):
            return


def _in_workers(specs, threads, parallel: int, folder: Path,
                stop: StopFlag) -> Iterator[tuple[int, list[Outcome]]]:
    """At most `parallel` groups at once, each in a process of its own (bnexp.jobs.workers.worker_main).

    A signal to the launcher goes on to every worker, which checkpoints its members; no new
    worker starts after one. A worker that dies without writing its outcomes is an error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pending, running = list(range(len(specs))), {}
    context = _worker_context()
    forwarded = False
    finished: list[tuple[int, list[Outcome]]] = []
    while pending or running or finished:
        while pending and len(running) < parallel and stop.signum is None:
            g = pending.pop(0)
            request = folder / f"group-{g}.pkl"
            outcomes_path(request).unlink(missing_ok=True)
            write_request(request, specs[g], threads[g])
            proc = context.Process(target=worker_main, args=(str(request), os.getpid()),
                                   name=f"bnexp-group-{g}")
            proc.start()
            running[g] = (proc, request)
        # handed over only now that their cores train the next groups: reporting a group's
        # jobs takes about a second, which the next group no longer waits for
        yield from finished
        finished = []
        if stop.signum is not None and not forwarded:
            for proc, _ in running.values():
                os.kill(proc.pid, stop.signum)
            forwarded = True
        for g, (proc, request) in list(running.items()):
            if proc.exitcode is None:  # note: exitcode polls the process
                continue
            del running[g]
            result = outcomes_path(request)
            if result.exists():
                finished.append((g, read_outcomes(result)))
                result.unlink()
                request.unlink()
            elif stop.signum is None:
                raise RuntimeError(f"the worker of group {g} ({len(specs[g])} runs) exited with "
                                   f"code {proc.exitcode} and no results; its output is above")
        if not finished:
            time.sleep(POLL_S)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if empty: requests of groups that did not finish stay for a look


def _worker_context():
    """Worker processes forked from a multiprocessing fork server that has imported torch, bnexp
    and torch._dynamo (which torch.optim imports on first use) once for the whole sweep.

    A fresh Python process per group paid those imports each time, seconds, more than a group
    of 13 convergence runs spends on its first 300 steps; a fork of the server is ready in a
    fraction of that (docs/results/measurements.md#batched-launcher-start-up). Forked from the server, not from this process: this one may
    have touched OpenMP, which does not survive a fork. A worker watches this process and
    stops when it dies (bnexp.jobs.workers._stop_with_launcher). Where there is no fork server
    (Windows), each worker is a fresh process that imports everything itself.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "bnexp.jobs.workers", "torch._dynamo"])
    return context


def start_early(launcher) -> None:
    """From the launcher's setup: start the workers' fork server before Hydra's sweeper
    composes every job's config to validate it (seconds for 75 jobs), so that its imports run
    on another core meanwhile instead of delaying the first group (docs/results/measurements.md#batched-launcher-start-up)."""
    if _processes(launcher) > 1 and _worker_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def make_executor(launcher):
    """The submitit executor of `executor=local|slurm` with the launcher's job parameters."""
    import submitit

    executor = submitit.AutoExecutor(folder=launcher.submitit_folder, cluster=launcher.executor,
                                     slurm_max_num_timeout=launcher.max_num_timeout)
    executor.update_parameters(**{"name": "bnexp-batched", **launcher.submitit})
    return executor


def _submitit(launcher, specs, threads) -> Iterator[tuple[int, list[Outcome]]]:
    """Each group as one submitit job (an array of them on SLURM); results in group order."""
    executor = make_executor(launcher)
    with executor.batch():
        jobs = [executor.submit(GroupJob(), group, n) for group, n in zip(specs, threads)]
    for job in jobs:
        log.info("group job %s submitted", job.job_id)
    for g, job in enumerate(jobs):
        yield g, job.result()


# -- 3. report ------------------------------------------------------------------------------


def report(launcher, job: Job, outcome: Outcome, group_size: int, threads: ThreadChoice) -> JobReturn:
    """Hydra's run_job again, with the real callbacks: the done line, the sweep objective."""

    def done(task_cfg: DictConfig) -> float:
        log.info("torch threads: %d (%s; trained in a batched group of %d)", threads.threads, threads.why,
                 group_size)
        return lifecycle.finish(outcome.summary)

    ret = run_job(hydra_context=launcher.hydra_context, task_function=done, config=job.config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return ret


def stop_if_unfinished(jobs: list[Job], finished: dict[int, Outcome], sweep_dir: Path,
                       signum: int | None) -> None:
    """User errors: one line each, exit 2. Interrupted or never started: the resume command,
    exit 128 + signal."""
    errors = sorted({o.error for o in finished.values() if o.error is not None})
    for error in errors[:-1]:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        lifecycle.fail(errors[-1])
    stopped = [o for o in finished.values() if o.signum is not None]
    missing = len(jobs) - len(finished)
    if not stopped and not missing:
        return
    signum = stopped[0].signum if stopped else signum or 2
    lifecycle.stop(signum, f"interrupted: {len(stopped)} runs checkpointed, {missing} not started, "
                           f"{len(finished) - len(stopped)} finished (kept).", sweep_resume_command(sweep_dir))


def sweep_resume_command(sweep_dir: Path) -> str:
    """This sweep's command line with its sweep dir: completed runs are kept, the others resume."""
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    return shlex.join([sys.executable, sys.argv[0], *args, f"hydra.sweep.dir={os.path.abspath(sweep_dir)}"])
