"""The training loop: K runs from their configs to summary.json; a solo run is K = 1.

A run is a sequence of *segments*: stretches of training steps between two *boundaries*
(evaluations, multiples of checkpoint_every and the last step: bnexp/run/schedule.py). Inside a segment nothing
touches the host: losses stay on the device. At a boundary the losses are written to
TensorBoard in bulk, divergence is checked, and the runs evaluate and/or checkpoint. A resumed
run restarts at its checkpoint (a boundary, or the step a signal stopped it at) with the same
weights, batches and random numbers, so every number it computes is the one an uninterrupted
run computes.

The loop holds K `Member`s (bnexp/run/member.py: one run each) and one engine
(bnexp/run/engine.py: one plain MLP for K = 1, a stacked model for K > 1) that takes their
steps. Each member is in one state: TRAINING (in its slot), WAITING (resumed at a later step
than the others: frozen until the loop reaches it) or DONE (completed, diverged: its slot
zeroed and frozen, K unchanged). Members never mix: a diverging member is finished at the
boundary where the loop sees it and the others go on, and a group run again over the same
dirs ends bitwise where an uninterrupted one ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp.run.checkpoint import CheckpointError
from bnexp.config import Config, ConfigError
from bnexp.run.data import DataError
from bnexp.run.progress import ProgressBar
from bnexp.run.engine import SoloEngine, StackedEngine
from bnexp.run.graphs import use_graphs
from bnexp.run.member import Member, Outcome
from bnexp.run.signals import RunInterrupted, StopFlag
from bnexp.run.runtime import choose_device, set_threads
from bnexp.run.schedule import is_checkpoint_point, is_eval_point, is_test_point, segment_ends

log = logging.getLogger("bnexp.run")

USER_ERRORS = (ConfigError, DataError, CheckpointError)  # one line for the user, no traceback
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format
TRAINING, WAITING, DONE = "training", "waiting", "done"


@dataclass
class MemberSpec:
    """One run of a group: its validated config, its run dir, and the log file of its job."""

    cfg: Config
    run_dir: Path
    log_file: Path | None = None


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


class Loop:
    """K members trained by one engine, segment by segment, from their steps to cfg.train.steps."""

    def __init__(self, members: list[Member], engine, logs: MemberLogs, progress: str = "quiet"):
        self.members, self.engine, self.logs, self.progress_mode = members, engine, logs, progress
        self.cfg = members[0].cfg  # what all members share: shapes, schedule, data (bnexp/jobs/groups.py)
        self.data = members[0].data
        self.state = [DONE if m.status in ("completed", "diverged") else WAITING for m in members]
        self.step = min((m.progress.step for m, s in zip(members, self.state) if s == WAITING),
                        default=self.cfg.train.steps)
        self.first_step = self.step

    def slots(self, state: str) -> list[int]:
        return [k for k, s in enumerate(self.state) if s == state]

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[Outcome]:
        """Train every member to cfg.train.steps (or divergence, or a signal); one Outcome each."""
        outcomes: dict[int, Outcome] = {}
        for k in self.slots(DONE):
            with self.logs.to(k):
                outcomes[k] = self.members[k].close_done()
        t = self.cfg.train
        start = time.perf_counter()
        for member in self.members:
            member.wall_start = start - member.progress.wall_s
        bar = self.display()
        self.engine.train()
        with StopFlag() as stop:
            self.activate_due()
            fresh = [k for k in self.slots(TRAINING) if self.members[k].progress.step == 0
                     and not self.members[k].progress.evals]
            if fresh:
                self.evaluate(fresh, is_test_point(0, t))
                self.show_progress(bar)
            while self.slots(TRAINING) + self.slots(WAITING) and self.step < t.steps:
                if not self.slots(TRAINING):  # only frozen slots until the next member's step
                    self.step = min(self.members[k].progress.step for k in self.slots(WAITING))
                    self.activate_due()
                    continue
                due = [self.members[k].progress.step for k in self.slots(WAITING)]
                end = min([next(segment_ends(self.step, t)), *due])
                self.run_segment(end, stop, bar)
                for k in self.diverged():
                    outcomes[k] = self.finish(k, None)
                if self.step < end:  # a signal cut the segment
                    break
                if is_eval_point(end, t):
                    self.evaluate(self.slots(TRAINING), is_test_point(end, t))
                    self.show_progress(bar)
                if is_checkpoint_point(end, t) and end < t.steps:  # the last one is finish's
                    self.checkpoint(self.slots(TRAINING))
                # Let the event writers' threads finish this boundary's events here rather than
                # during the next segment, where they would compete with torch's threads for the cores.
                for k in self.slots(TRAINING):
                    self.members[k].monitor.flush()
                if stop.signum is not None:  # after the boundary's work: a resume starts from a whole boundary
                    break
                self.activate_due()
            if bar is not None:
                bar.close()
            for k in self.slots(TRAINING) + self.slots(WAITING):
                outcomes[k] = self.finish(k, stop.signum)
        return [outcomes[k] for k in range(len(self.members))]

    def run_segment(self, end: int, stop: StopFlag, bar: ProgressBar | None) -> None:
        """Train every training slot from self.step up to `end` (or until a signal), then give
        each training member its steps, time, losses and probe values.

        Probe steps (multiples of probe.every) run inside the segment; their values stay on the
        device like the losses and are written with them, not at a boundary of their own.
        """
        training = self.slots(TRAINING)
        orders = [m.order if s == TRAINING else None for m, s in zip(self.members, self.state)]
        losses = torch.zeros(end - self.step, len(self.members), device=self.members[0].device)
        every, first = self.cfg.probe.every, self.step + 1
        probes: dict[int, list] = {k: [] for k in training}
        done = 0
        start = time.perf_counter()
        while done < len(losses) and stop.signum is None:
            batches = [None if order is None else order.next() for order in orders]
            if every and (first + done) % every == 0:
                results = self.engine.probed_step(training, self.members, batches, stepped=first + done > 1)
                for k, (loss, values) in results.items():
                    losses[done, k] = loss
                    probes[k].append((first + done, values))
            else:
                losses[done] = self.engine.step(batches)
            done += 1
            if bar is not None:
                bar.tick(self.step + done)
        values = losses[:done].t().tolist()  # note: the segment's one host sync (record_probes adds one)
        seconds = time.perf_counter() - start  # probes included: they run between steps
        self.step += done
        now = time.perf_counter()
        for k in training:
            member = self.members[k]
            p = member.progress
            p.step += done
            p.train_s += seconds  # the K members trained in the same seconds
            with self.logs.to(k):
                member.record_losses(first, values[k])
                member.record_probes(probes[k])
            p.wall_s = now - member.wall_start

    def diverged(self) -> list[int]:
        return [k for k in self.slots(TRAINING) if self.members[k].progress.diverged_at_step is not None]

    # -- members in and out of their slots ---------------------------------------------------

    def activate_due(self) -> None:
        """Members whose own step the loop has reached take their slot and start training."""
        due = [k for k in self.slots(WAITING) if self.members[k].progress.step == self.step]
        self.engine.load(due, self.members)
        for k in due:
            self.state[k] = TRAINING

    def finish(self, k: int, signum: int | None) -> Outcome:
        """Finish member k (a diverged one evaluated as divergence left it), then freeze its slot."""
        member = self.members[k]
        if self.state[k] == TRAINING:
            if member.status == "diverged" and member.progress.evals[-1]["step"] != member.progress.step:
                self.evaluate([k], test=True)  # final metrics describe the model as divergence left it
            self.engine.store([k], self.members, stepped=member.progress.step > 0)
        else:  # waiting: it took no step here, so its wall time did not run
            member.wall_start = time.perf_counter() - member.progress.wall_s
        self.state[k] = DONE
        self.engine.freeze(k)
        with self.logs.to(k):
            return member.finish(signum)

    # -- boundaries ---------------------------------------------------------------------------

    def evaluate(self, slots: list[int], test: bool) -> None:
        """Measure every slot on the validation split (and, at a test point, the test set) through
        the engine, then let each member record it. Choices are made on validation; the test set
        is measured once at the end (is_test_point), so nothing is chosen on it."""
        if not slots:
            return
        metrics = {}
        metrics["val/loss"], metrics["val/acc"] = self.engine.measure(self.data.val_x, self.data.val_y)
        if test:
            metrics["test/loss"], metrics["test/acc"] = self.engine.measure(self.data.test_x, self.data.test_y)
        self.engine.store(slots, self.members, stepped=None)  # running stats, percentiles: its own model
        for k in slots:
            with self.logs.to(k):
                self.members[k].record_evaluation({tag: values[k] for tag, values in metrics.items()})

    def checkpoint(self, slots: list[int]) -> None:
        now = time.perf_counter()
        for k in slots:
            member = self.members[k]
            self.engine.store([k], self.members, stepped=member.progress.step > 0)
            member.progress.wall_s = now - member.wall_start
            member.checkpoint()

    # -- what the console shows ---------------------------------------------------------------

    def display(self) -> ProgressBar | None:
        """A solo run's progress bar (a line per evaluation off a terminal); None for a group,
        which logs one line per evaluation for all its members (show_progress)."""
        if len(self.members) > 1:
            return None
        return ProgressBar(self.cfg.train.steps, self.members[0].progress.step, self.progress_mode)

    def show_progress(self, bar: ProgressBar | None) -> None:
        training = self.slots(TRAINING)
        if bar is not None:
            p = self.members[0].progress
            rate = p.step / p.train_s if p.train_s > 0 else float("nan")
            bar.update(p.step, p.last_train_loss, p.evals[-1]["val/acc"], rate)
        elif training and self.step > self.first_step:
            train_s = self.members[training[0]].progress.train_s
            log.info("group of %d: step %d/%d, %d training, %d finished, %.0f model-steps/s",
                     len(self.members), self.step, self.cfg.train.steps, len(training),
                     len(self.slots(DONE)), len(training) * self.step / max(1e-9, train_s))


def make_engine(members: list[Member]):
    """One plain model for one member, a stacked one for more; steps captured as a CUDA graph
    where train.cuda_graphs and the run allow it (bnexp/run/graphs.py), said in one log line on a GPU."""
    first = members[0]
    graphed, why = use_graphs(first.cfg, first.device)
    if first.device.type == "cuda":
        log.info("cuda graphs: %s (%s)", "on" if graphed else "off", why)
    return SoloEngine(first, graphed) if len(members) == 1 else StackedEngine(members, graphed)


def fit(specs: list[MemberSpec], progress: str = "quiet") -> list[Outcome]:
    """Build the members of `specs` (the first loads the data, the others share it) and train them."""
    logs = MemberLogs([spec.log_file for spec in specs])
    try:
        members, data = [], None
        where = choose_device(specs[0].cfg, len(specs))  # members share it (bnexp/jobs/groups.py)
        device = where.device
        if len(specs) > 1:  # a solo run's device line is bnexp/cli.py's
            log.info("device: %s (%s; a group of %d)", device, where.why, len(specs))
        for k, spec in enumerate(specs):
            with logs.to(k):
                member = Member(spec.cfg, spec.run_dir, data, device)
            data = member.data
            members.append(member)
        return Loop(members, make_engine(members), logs, progress).fit()
    finally:
        logs.close()


def train(cfg: Config, run_dir: Path, progress: str = "auto") -> dict:
    """Train one run of `cfg` in run_dir (resuming from its checkpoint if any); return the summary.

    progress: auto (a tqdm bar on a terminal, else a log line per evaluation) | quiet (neither).
    A stop signal raises RunInterrupted after the run saved its checkpoint and summary.json.
    """
    outcome = fit([MemberSpec(cfg, Path(run_dir))], progress)[0]
    if outcome.signum is not None:
        raise RunInterrupted(outcome.signum, outcome.summary)
    return outcome.summary


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
    try:
        return fit(specs)
    except USER_ERRORS as exc:
        return [Outcome(None, error=str(exc)) for _ in specs]
