"""A group: K runs of one shape trained as one vectorized model, each still a run of its own.

Every member is a solo `bnexp.train.Run` (`Member`): its dir, its init (built and seeded as a
solo run builds it), its data order, TensorBoard writer, checkpoints, model.pt and
summary.json are that Run's. The group only takes the training steps, all members at once in
one `bnexp.batched.BatchedMLP`, and hands each member's tensors back to its Run at the
boundaries where a Run looks at them: evaluation, checkpoint, finish. So a member's dir is
what a solo run writes (a member dir can even be resumed solo), and the numbers are a solo
run's up to float rounding (tests/test_group.py measures how close).

Members are independent. A member whose loss turns NaN/inf is recorded `diverged` at the
boundary where the loop looks (as a solo run is) and finished; its slot in the stack is zeroed
and frozen, so the others go on unaffected.

Resume. A group never changes shape: K is fixed for its life, and a finished member's slot
stays (zeroed) instead of being removed. Since no operation mixes slots, a member's numbers
depend only on its own values and on K, so a group started again over the same member dirs
ends bitwise where an uninterrupted one does. Members may even restart from different steps
(a kill while the K checkpoints were being written): the group starts at the lowest step and
a member waits, frozen, until the group reaches its step. Completed members are not trained.

`group_key` and `make_groups` decide which runs can share a group; `train_group` trains one
group (of any size: a group of one is a plain solo run); `GroupJob` is the same for submitit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp.atomic import atomic_write
from bnexp.batched import BatchedMLP, evaluate_members, member_losses, stacked_optimizer
from bnexp.checkpoint import CheckpointError
from bnexp.config import Config, ConfigError, flatten
from bnexp.data import MNIST, DataError
from bnexp.runtime import set_threads
from bnexp.train import (Run, RunInterrupted, StopFlag, is_checkpoint_point, is_eval_point, run_status,
                         run_summary, segment_ends, train)

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, DataError, CheckpointError)
# What may differ between the members of one group: each member keeps its own value of these.
# Everything else (shapes, norm, optimizer kind, steps, batch size, schedules, data, device,
# threads) is shared, because the members take their steps together in one model.
MEMBER_KEYS = (
    "seed",             # own init and batch order
    "optim.lr",         # a (K, 1) column in the stacked update
    "optim.momentum",   # likewise (SGD)
    "model.init_std",   # only the init: each member is built as its solo run
    "name",             # a label in summary.json
    "train.log_every",  # each member writes its own TensorBoard
    "train.tensorboard",
    "train.resume",     # each member looks at its own checkpoint
)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


# -- which runs share a group -------------------------------------------------------------


def group_key(cfg: Config) -> tuple:
    """What all members of a group must share: the flattened config without MEMBER_KEYS."""
    return tuple(sorted((k, v) for k, v in flatten(cfg).items() if k not in MEMBER_KEYS))


def solo_reason(cfg: Config) -> str | None:
    """Why this run cannot share a group and trains alone, or None when it can.

    BatchedMLP has no noisy norm and only the norm before the nonlinearity; the group's step
    takes no probe steps (they need each member's own loss landscape, bnexp/probes.py).
    """
    if cfg.probe.every > 0:
        return f"probe.every={cfg.probe.every} (the batched step takes no probe steps)"
    if cfg.norm.name == "custom_noisy":
        return "norm=custom_noisy (no batched noisy norm)"
    if cfg.norm.position != "before" and cfg.norm.name != "none":
        return f"norm.position={cfg.norm.position} (the batched model has the norm before the nonlinearity only)"
    return None


def make_groups(cfgs: list[Config], max_batch: int, processes: int = 1) -> list[list[int]]:
    """Indices of cfgs in groups of compatible runs, each of at most max_batch, in job order.

    A class of n compatible runs becomes near-equal groups (26 runs with max_batch 25: 13 + 13,
    not 25 + 1). With `processes` group processes at once, the size cap may shrink (see
    balanced_cap) so that the groups fill every round. A group of one is a solo run, and so is
    every run with a solo_reason (logged).
    """
    if max_batch < 1:
        raise ConfigError(f"hydra.launcher.max_batch={max_batch!r} is not allowed: an integer >= 1")
    classes: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = solo_reason(cfg)
        if reason is not None:
            log.info("job #%d runs alone: %s", i, reason)
        classes.setdefault(group_key(cfg) if reason is None else ("solo", i), []).append(i)
    cap = balanced_cap([len(members) for members in classes.values()], max_batch, processes)
    groups = []
    for members in classes.values():
        count = math.ceil(len(members) / cap)
        size, extra = divmod(len(members), count)
        start = 0
        for g in range(count):
            end = start + size + (g < extra)
            groups.append(members[start:end])
            start = end
    return groups


def balanced_cap(class_sizes: list[int], max_batch: int, processes: int) -> int:
    """The largest group size cap, from max_batch down to half of it, that makes the number of
    groups a multiple of `processes`, so that no round of group processes leaves a core idle.

    experiment=convergence (3 classes of 25) on 2 processes: 3 groups of 25 run in two rounds,
    the second on one core; 6 groups of 12-13 run in three full rounds, 316 s instead of 416 s
    (`python scripts/bench.py --sections sweep`, max_batch=13 against 25), although a group of
    13 takes fewer model-steps per second than one of 25. If no cap in that range balances, max_batch.
    """
    if processes > 1:
        for cap in range(max_batch, (max_batch + 1) // 2 - 1, -1):
            if sum(math.ceil(n / cap) for n in class_sizes) % processes == 0:
                return cap
    return max_batch


# -- one group ----------------------------------------------------------------------------


@dataclass
class MemberSpec:
    """One run of a group: its validated config, its run dir, and the log file of its job."""

    cfg: Config
    run_dir: Path
    log_file: Path | None = None


@dataclass
class Outcome:
    """What a member ended with: its summary (status completed, diverged or interrupted), the
    signal that interrupted it, or the one-line user error that stopped its group."""

    summary: dict | None
    signum: int | None = None
    error: str | None = None


class Member(Run):
    """A solo Run whose training steps a Group takes; everything else is the Run's own.

    It shares the group's data (one copy of MNIST per group) and, when the group has measured
    it, takes its validation and test metrics from the batched evaluation.
    """

    def __init__(self, cfg: Config, run_dir: Path, data: MNIST | None = None):
        self._shared_data = data
        self.measured: dict[str, float] | None = None
        super().__init__(cfg, run_dir, progress="quiet")
        # The global RNG state this run's solo twin would checkpoint (seeded, then advanced by
        # building the model); nothing in training draws from it, so it stays valid.
        self.rng = (torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.wall_start = 0.0
        self.mark_loaded()

    def _load_data(self) -> MNIST:
        return super()._load_data() if self._shared_data is None else self._shared_data

    def measure(self) -> dict[str, float]:
        return super().measure() if self.measured is None else self.measured

    def _checkpoint(self) -> None:
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state_all(self.rng[1])
        super()._checkpoint()

    def mark_loaded(self) -> None:
        """Remember the batch-norm counters now: the group adds the steps it takes from here."""
        self.loaded_step = self.progress.step
        self.loaded_tracked = {name: int(buf) for name, buf in self.model.named_buffers()
                               if name.endswith("num_batches_tracked")}

    @torch.no_grad()
    def set_tracked(self) -> None:
        """num_batches_tracked as a solo run counts it: one per training step."""
        buffers = dict(self.model.named_buffers())
        for name, start in self.loaded_tracked.items():
            buffers[name].fill_(start + self.progress.step - self.loaded_step)


class MemberLogs:
    """Log lines about one member also go to that member's own log file (its job's .log)."""

    def __init__(self, paths: list[Path | None]):
        self.paths = paths
        self.handlers: dict[int, logging.Handler] = {}

    @contextlib.contextmanager
    def to(self, k: int):
        path = self.paths[k]
        if path is None:
            yield
            return
        if k not in self.handlers:
            self.handlers[k] = logging.FileHandler(path)
            self.handlers[k].setFormatter(logging.Formatter(LOG_FORMAT))
        logger = logging.getLogger("bnexp")
        logger.addHandler(self.handlers[k])
        try:
            yield
        finally:
            logger.removeHandler(self.handlers[k])

    def close(self) -> None:
        for handler in self.handlers.values():
            handler.close()


TRAINING, WAITING, DONE = "training", "waiting", "done"


class Group:
    """K Members trained as one BatchedMLP, segment by segment, as bnexp.train.Run.fit does one."""

    def __init__(self, specs: list[MemberSpec], logs: MemberLogs):
        self.logs, self.members = logs, []
        data = None
        for k, spec in enumerate(specs):
            with logs.to(k):
                member = Member(spec.cfg, spec.run_dir, data)  # the first loads the data
            data = member.data
            self.members.append(member)
        first = self.members[0]
        self.cfg, self.data, self.device, self.size = first.cfg, data, first.device, len(specs)
        m = self.cfg.model
        self.model = BatchedMLP(self.size, m.widths, m.activation, self.cfg.norm.name,
                                self.cfg.norm.compile).to(self.device)
        self.optimizer = stacked_optimizer(self.model.parameter_stacks(), [m.optimizer for m in self.members])
        self.state = [DONE if run_status(m.progress, self.cfg.train.steps) in ("completed", "diverged") else WAITING
                      for m in self.members]
        self.step = min((m.progress.step for m, s in zip(self.members, self.state) if s == WAITING),
                        default=self.cfg.train.steps)
        self.first_step = self.step
        self.dummy = torch.arange(self.cfg.train.batch_size, device=self.device)  # a frozen slot's batch

    def slots(self, state: str) -> list[int]:
        return [k for k, s in enumerate(self.state) if s == state]

    # -- moving a member in and out of its slot ----------------------------------------------

    def activate_due(self) -> None:
        """Members whose own step the group has reached take their slot and start training."""
        for k in self.slots(WAITING):
            member = self.members[k]
            if member.progress.step == self.step:
                self.model.load_member(k, member.model)
                self.optimizer.load_member(k, member.model, member.optimizer)
                member.mark_loaded()
                self.state[k] = TRAINING

    def store(self, k: int, optimizer: bool = True) -> None:
        """Copy slot k back into member k's own model (and optimizer) as its solo Run holds them."""
        member = self.members[k]
        self.model.store_member(k, member.model)
        member.set_tracked()
        if optimizer:
            self.optimizer.store_member(k, member.model, member.optimizer, stepped=member.progress.step > 0)

    def finish(self, k: int, signum: int | None) -> Outcome:
        """Finish member k as its Run finishes (final eval if diverged, checkpoint, model.pt,
        summary.json); then zero and freeze its slot."""
        member = self.members[k]
        if self.state[k] == TRAINING:
            self.store(k)
        else:  # waiting: it took no step here, so its own tensors are already current
            member.wall_start = time.perf_counter() - member.progress.wall_s
        self.state[k] = DONE
        self.model.zero_slot(k)
        self.optimizer.freeze(k)
        try:
            with self.logs.to(k):
                return Outcome(member._finish(signum, member.wall_start))
        except RunInterrupted as stop:
            return Outcome(stop.summary, signum=stop.signum)

    # -- the loop ---------------------------------------------------------------------------

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One step of every slot; idx (K, B) holds each slot's batch. Returns the (K,) losses."""
        flat = idx.view(-1)
        x = self.data.train_x.index_select(0, flat).view(*idx.shape, -1)
        y = self.data.train_y.index_select(0, flat).view(idx.shape)
        losses = member_losses(self.model, x, y)
        self.optimizer.zero_grad()
        losses.sum().backward()  # d(sum)/d(member k's loss) = 1: each member gets its own gradient
        self.optimizer.step()
        return losses.detach()

    def run_segment(self, end: int, stop: StopFlag) -> tuple[int, list[list[float]], float]:
        """Train every training slot from self.step up to `end` (or until a signal).

        Returns the steps done, each slot's losses, and the seconds it took.
        """
        losses = torch.empty(end - self.step, self.size, device=self.device)
        orders = [m.order if s == TRAINING else None for m, s in zip(self.members, self.state)]
        done = 0
        start = time.perf_counter()
        while done < len(losses) and stop.signum is None:
            idx = torch.stack([self.dummy if order is None else order.next() for order in orders])
            losses[done] = self.train_step(idx)
            done += 1
        values = losses[:done].t().tolist()  # note: the segment's one host sync
        return done, values, time.perf_counter() - start

    def record(self, done: int, values: list[list[float]], seconds: float) -> list[int]:
        """Give each training member its steps, time and losses; return those that diverged."""
        now = time.perf_counter()
        diverged = []
        for k in self.slots(TRAINING):
            member = self.members[k]
            p = member.progress
            p.step += done
            p.train_s += seconds  # the K members trained in the same seconds
            with self.logs.to(k):
                member.record_losses(values[k])
            p.wall_s = now - member.wall_start
            if p.diverged_at_step is not None:  # run_status: diverged
                diverged.append(k)
        return diverged

    def evaluate(self, slots: list[int]) -> None:
        """Measure every slot in one batched pass, then let each member's Run record it."""
        if not slots:
            return
        val_loss, val_acc = evaluate_members(self.model, self.data.val_x, self.data.val_y)
        test_loss, test_acc = evaluate_members(self.model, self.data.test_x, self.data.test_y)
        for k in slots:
            member = self.members[k]
            self.store(k, optimizer=False)  # running stats and percentiles come from its own model
            member.measured = {"val/loss": val_loss[k], "val/acc": val_acc[k],
                               "test/loss": test_loss[k], "test/acc": test_acc[k]}
            with self.logs.to(k):
                member.evaluate_all()
            member.measured = None

    def checkpoint(self, slots: list[int]) -> None:
        now = time.perf_counter()
        for k in slots:
            member = self.members[k]
            self.store(k)
            member.progress.wall_s = now - member.wall_start
            member._checkpoint()

    def fit(self) -> list[Outcome]:
        """Train every member to cfg.train.steps (or divergence, or a signal); one Outcome each."""
        outcomes: dict[int, Outcome] = {}
        for k in self.slots(DONE):
            member = self.members[k]
            with self.logs.to(k):
                log.info("%s already %s at step %d: nothing to do", member.run_dir,
                         run_status(member.progress, self.cfg.train.steps), member.progress.step)
            member.monitor.close()
            outcomes[k] = Outcome(run_summary(member.progress, member.cfg))
        t = self.cfg.train
        steps = t.steps
        start = time.perf_counter()
        for member in self.members:
            member.wall_start = start - member.progress.wall_s
        self.model.train()
        with StopFlag() as stop:
            self.activate_due()
            self.evaluate([k for k in self.slots(TRAINING)
                           if self.members[k].progress.step == 0 and not self.members[k].progress.evals])
            while self.slots(TRAINING) + self.slots(WAITING) and self.step < steps and stop.signum is None:
                due = [self.members[k].progress.step for k in self.slots(WAITING)]
                if not self.slots(TRAINING):  # only frozen slots until the next member's step
                    self.step = min(due)
                    self.activate_due()
                    continue
                end = min([next(segment_ends(self.step, t)), *due])
                done, values, seconds = self.run_segment(end, stop)
                self.step += done
                for k in self.record(done, values, seconds):
                    outcomes[k] = self.finish(k, None)
                if stop.signum is not None:
                    break
                if is_eval_point(self.step, t):
                    self.evaluate(self.slots(TRAINING))
                    self.report_progress(start)
                if is_checkpoint_point(self.step, t) and self.step < steps:  # the last one is finish's
                    self.checkpoint(self.slots(TRAINING))
                for k in self.slots(TRAINING):  # see Run.fit: events written here, not mid-segment
                    self.members[k].monitor.flush()
                self.activate_due()
            for k in self.slots(TRAINING) + self.slots(WAITING):
                outcomes[k] = self.finish(k, stop.signum)
        return [outcomes[k] for k in range(self.size)]

    def report_progress(self, start: float) -> None:
        """One console line per evaluation for the whole group (members log nothing per eval)."""
        training = self.slots(TRAINING)
        rate = len(training) * (self.step - self.first_step) / max(1e-9, time.perf_counter() - start)
        done = sum(s == DONE for s in self.state)
        log.info("group of %d: step %d/%d, %d training, %d finished, %.0f model-steps/s (evaluation included)",
                 self.size, self.step, self.cfg.train.steps, len(training), done, rate)


def train_group(specs: list[MemberSpec], threads: int | None = None) -> list[Outcome]:
    """Train one group (a group of one is a plain solo run); one Outcome per member.

    threads: torch CPU threads for the group's one process (None: leave as set).
    User errors (a bad checkpoint, data that cannot be read) end the group before any step
    and come back as Outcome.error, one line each.
    """
    if threads is not None:
        set_threads(threads)
    log.info("torch threads: %d for a group of %d run%s", torch.get_num_threads(), len(specs),
             "" if len(specs) == 1 else "s")
    logs = MemberLogs([spec.log_file for spec in specs])
    try:
        if len(specs) == 1:
            return [_solo(specs[0], logs)]
        return Group(specs, logs).fit()
    except USER_ERRORS as exc:
        return [Outcome(None, error=str(exc)) for _ in specs]
    finally:
        logs.close()


def _solo(spec: MemberSpec, logs: MemberLogs) -> Outcome:
    """A group of one: the solo path itself, bnexp.train.train."""
    try:
        with logs.to(0):
            return Outcome(train(spec.cfg, spec.run_dir, progress="quiet"))
    except RunInterrupted as stop:
        return Outcome(stop.summary, signum=stop.signum)


class GroupJob:
    """train_group as a submitit job: checkpoint() resubmits it when the cluster preempts or
    times it out, and the group then resumes from its members' checkpoints."""

    def __call__(self, specs: list[MemberSpec], threads: int | None) -> list[Outcome]:
        _log_to_stderr()
        return train_group(specs, threads)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# -- a group in a process of its own ------------------------------------------------------


def write_request(path: Path, specs: list[MemberSpec], threads: int | None) -> None:
    """The file a worker process reads: the group's members and its threads."""
    atomic_write(path, pickle.dumps({"specs": specs, "threads": threads}))


def read_outcomes(path: Path) -> list[Outcome]:
    return pickle.loads(Path(path).read_bytes())


def outcomes_path(request: Path) -> Path:
    return Path(request).with_suffix(".out")


def worker_main(request: str, launcher_pid: int | None = None) -> None:
    """Entry of a group worker process: train the group of `request`, write its outcomes."""
    if launcher_pid is not None:
        _stop_with_launcher(launcher_pid)
    _log_to_stderr()
    job = pickle.loads(Path(request).read_bytes())
    outcomes = train_group(job["specs"], job["threads"])
    atomic_write(outcomes_path(Path(request)), pickle.dumps(outcomes))


def _stop_with_launcher(pid: int) -> None:
    """SIGTERM this worker when the launcher (process `pid`) exits, even by kill -9, so that it
    checkpoints and exits instead of training on alone (and racing a rerun of the sweep for its
    dirs). A thread waits on a pidfd of the launcher (Linux >= 5.3; elsewhere nothing watches).

    Not PR_SET_PDEATHSIG: a worker's parent is the launcher's fork server, which every worker
    keeps alive (each holds the server's liveness pipe) until it exits itself.
    """
    if not hasattr(os, "pidfd_open"):
        return

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            os.kill(os.getpid(), signal.SIGTERM)
            return
        select.select([fd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _log_to_stderr() -> None:
    """A process of its own has no Hydra logging: INFO lines to stderr in Hydra's format."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
