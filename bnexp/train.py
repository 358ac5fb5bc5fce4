"""The step loop: one run from a validated Config to summary.json. Knows nothing of Hydra.

A run is a sequence of *segments*: stretches of training steps between two *boundaries*
(multiples of eval_every or checkpoint_every, and the last step). Inside a segment nothing
touches the host: losses stay on the device. At a boundary the losses are written to
TensorBoard in bulk, divergence is checked, and the run evaluates and/or checkpoints.
A resumed run restarts at its checkpoint (a boundary, or the step a signal stopped it at) with
the same weights, batches and random numbers, so every number it computes is the same as in
an uninterrupted run.
"""

from __future__ import annotations

import io
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from bnexp import checkpoint as ckpt
from bnexp.atomic import atomic_write, write_json
from bnexp.config import Config, ConfigError, TrainConfig, flatten, resolve_data_root
from bnexp.data import MNIST, load_mnist
from bnexp.model import MLP, init_weights
from bnexp.monitor import make_monitor
from bnexp.progress import ProgressBar
from bnexp.noise import seed_noise
from bnexp.probes import probed_step, train_mode_accuracy
from bnexp.runtime import pick_device

log = logging.getLogger(__name__)

THRESHOLDS = ("0.90", "0.95", "0.97", "0.98")
PROBE_SIZE = 1000  # test images whose pre-activations give the act/ percentiles


class RunInterrupted(Exception):
    """A stop signal (StopFlag.SIGNALS) ended the run after it saved a checkpoint and summary.json."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.summary = signum, summary


class BatchOrder:
    """Shuffled epochs sliced into equal batches (the last partial batch of an epoch is dropped).

    A dedicated generator makes the order independent of anything else that draws random
    numbers; its state and the position in the epoch go into checkpoints.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed ^ 0x5EED)
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator).to(self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        perm = None if self.perm is None else self.perm.cpu()
        return {"generator": self.generator.get_state(), "perm": perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        self.pos = state["pos"]


@dataclass
class Progress:
    """Everything about a run's history besides tensors; a checkpoint carries it as a plain dict."""

    step: int = 0
    diverged_at_step: int | None = None  # the first step whose loss was not finite: the run's status follows
    evals: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # train losses since the last eval point, for final.train_loss
    loss_count: int = 0
    last_train_loss: float = float("nan")
    train_s: float = 0.0
    wall_s: float = 0.0


class StopFlag:
    """Turns stop signals into a flag the loop polls once per step (a Python bool: no cost).

    SIGINT is Ctrl-C; SIGTERM is kill and how SLURM preempts, requeues or cancels a job;
    SIGUSR2 is what submitit's SLURM jobs get before their time limit (bnexp/cluster.py).
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """SGD (with optional momentum) or Adam, from the optim config group (validated: sgd or adam)."""
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.Adam(params, lr=cfg.optim.lr)


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split in eval mode; (nan, nan) for an empty split."""
    if len(x) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)  # note: host sync, once per eval


def steps_to_test_acc(evals: list[dict]) -> dict[str, int | None]:
    """For each threshold, the first evaluated step whose test accuracy reached it, else None."""
    reached: dict[str, int | None] = {}
    for t in THRESHOLDS:
        hits = [e["step"] for e in evals if e["test/acc"] >= float(t)]
        reached[t] = min(hits) if hits else None
    return reached


def segment_ends(start: int, t: TrainConfig) -> Iterator[int]:
    """The boundaries after step `start`, in order: multiples of eval_every or checkpoint_every, and the last step."""
    step = start
    while step < t.steps:
        step = min((step // t.eval_every + 1) * t.eval_every,
                   (step // t.checkpoint_every + 1) * t.checkpoint_every, t.steps)
        yield step


def is_eval_point(step: int, t: TrainConfig) -> bool:
    return step % t.eval_every == 0 or step == t.steps


def is_checkpoint_point(step: int, t: TrainConfig) -> bool:
    return step % t.checkpoint_every == 0 or step == t.steps


def run_status(p: Progress, steps: int) -> str:
    """The run's status, decided here and nowhere else: diverged once a loss was not finite,
    completed once all `steps` are done, else interrupted (stopped short by a signal, or not yet resumed)."""
    if p.diverged_at_step is not None:
        return "diverged"
    return "completed" if p.step >= steps else "interrupted"


def run_summary(p: Progress, cfg: Config) -> dict:
    """summary.json (design.md): a pure function of the run's progress and its config."""
    status, last = run_status(p, cfg.train.steps), p.evals[-1]
    return {
        "status": status,
        "norm": cfg.norm.name,
        "seed": cfg.seed,
        "steps_done": p.diverged_at_step if status == "diverged" else p.step,
        "diverged_at_step": p.diverged_at_step,
        "final": {"train_loss": p.last_train_loss, "val_acc": last["val/acc"],
                  "test_acc": last["test/acc"], "test_loss": last["test/loss"],
                  **({"test_acc_train_mode": last["test/acc_train_mode"]}  # probe.train_mode_acc only
                     if "test/acc_train_mode" in last else {})},
        "steps_to_test_acc": steps_to_test_acc(p.evals),
        "wall_s": round(p.wall_s, 3),
        "train_steps_per_s": round(p.step / p.train_s, 1) if p.train_s > 0 else None,
        "config": flatten(cfg),
    }


def eval_metrics(record: dict) -> dict[str, float]:
    """An evaluation record without its step: what TensorBoard and hparams get."""
    return {k: v for k, v in record.items() if k != "step"}


class Run:
    """One training run in one run dir: builds everything, then trains segment by segment."""

    def __init__(self, cfg: Config, run_dir: Path, progress: str = "auto"):
        self.cfg, self.run_dir, self.progress_mode = cfg, Path(run_dir), progress
        self.flat = flatten(cfg)
        self.device = pick_device(cfg.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved = None if cfg.train.resume == "never" else ckpt.load_checkpoint(self.run_dir, self.flat)
        self.data = self._load_data()
        torch.manual_seed(cfg.seed)
        n = cfg.norm
        noise = {"shift": n.noise_shift, "scale": n.noise_scale, "jitter": n.noise_jitter}
        self.model = MLP(cfg.model.widths, cfg.model.activation, n.name, n.compile,
                         position=n.position, noise=noise if n.name == "custom_noisy" else None)
        init_weights(self.model, cfg.model.init_std, torch.Generator().manual_seed(cfg.seed))
        seed_noise(self.model, cfg.seed)  # norm=custom_noisy only: its generators, before a resume restores them
        self.model.to(self.device)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.order = BatchOrder(len(self.data.train_x), cfg.train.batch_size, cfg.seed, self.device)
        self.progress = Progress()
        if saved is not None:
            self.progress = Progress(**ckpt.restore(saved, self.model, self.optimizer, self.order))
            log.info("resuming from %s at step %d", self.run_dir / ckpt.CHECKPOINT, self.progress.step)
        purge = self.progress.step + 1 if saved is not None else 0
        self.monitor = make_monitor(self.run_dir, purge, cfg.train.tensorboard)
        self.probe = self.data.test_x[:PROBE_SIZE]

    def _load_data(self) -> MNIST:
        """The data, and train.batch_size's upper bound: the images left for training, known only now."""
        d = self.cfg.data
        data = load_mnist(resolve_data_root(d.root), val_size=d.val_size, normalize=d.normalize,
                          device=self.device, verify=d.verify)
        n = len(data.train_x)
        if self.cfg.train.batch_size > n:
            raise ConfigError(f"train.batch_size={self.cfg.train.batch_size} is not allowed: "
                              f"at most the training set size, {n} images")
        return data

    def _checkpoint(self) -> None:
        """Flush TensorBoard, then atomically save model, optimizer, RNGs, data order and history."""
        self.monitor.flush()
        ckpt.save_checkpoint(self.run_dir, config=self.flat, model=self.model, optimizer=self.optimizer,
                             order=self.order, progress=asdict(self.progress))

    # -- the loop ---------------------------------------------------------------------------

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.data.train_x.index_select(0, idx)
        y = self.data.train_y.index_select(0, idx)
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def probed_train_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """train_step with the landscape and ICS probes around it (bnexp/probes.py): same result, plus probe values."""
        x = self.data.train_x.index_select(0, idx)
        y = self.data.train_y.index_select(0, idx)
        lr = self.optimizer.param_groups[0]["lr"]
        return probed_step(self.model, x, y, lr, lambda: self.train_step(idx),
                           self.cfg.probe.multiples, self.cfg.probe.ics)

    def run_segment(self, end: int, stop: StopFlag, tick=None) -> list[float]:
        """Train from progress.step up to `end` (or until a signal); return the per-step losses.

        Probe steps (multiples of probe.every) run inside the segment; their values stay on the
        device like the losses and are written with them (record_probes), not at a boundary of their own.
        tick(step), if given, is called after each step with the host's step count (no sync).
        """
        losses = torch.empty(end - self.progress.step, device=self.device)
        every, first = self.cfg.probe.every, self.progress.step + 1
        probes: list[tuple[int, dict[str, torch.Tensor]]] = []
        done = 0
        start = time.perf_counter()
        while done < len(losses) and stop.signum is None:
            if every and (first + done) % every == 0:
                losses[done], values = self.probed_train_step(self.order.next())
                probes.append((first + done, values))
            else:
                losses[done] = self.train_step(self.order.next())
            done += 1
            if tick is not None:
                tick(self.progress.step + done)
        values = losses[:done].tolist()  # note: the segment's one host sync (record_probes adds one)
        self.progress.train_s += time.perf_counter() - start  # probes included: they run between steps
        self.progress.step += done
        self.record_probes(probes)
        return values

    def record_probes(self, probes: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
        """Write a segment's probe values: one host sync for all of them."""
        if not probes:
            return
        tags = list(probes[0][1])
        rows = torch.stack([torch.stack([v[t].float() for t in tags]) for _, v in probes]).tolist()
        for (step, _), row in zip(probes, rows):
            self.monitor.probes(step, dict(zip(tags, row)))

    def record_losses(self, values: list[float]) -> None:
        """Log a segment's losses, update the running mean, and note the step of a non-finite loss."""
        p = self.progress
        first = p.step - len(values) + 1
        self.monitor.train_losses(first, values, self.cfg.train.log_every)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                p.diverged_at_step = first + i
                log.warning("loss is %s at step %d: the run diverged (recorded, not an error)",
                            value, first + i)
                return
            p.loss_sum += value
            p.loss_count += 1

    def measure(self) -> dict[str, float]:
        """Validation and test loss and accuracy of the model as it is now (a batched group
        measures all its members at once and overrides this, bnexp/group.py)."""
        val_loss, val_acc = evaluate(self.model, self.data.val_x, self.data.val_y)
        test_loss, test_acc = evaluate(self.model, self.data.test_x, self.data.test_y)
        return {"val/loss": val_loss, "val/acc": val_acc, "test/loss": test_loss, "test/acc": test_acc}

    def evaluate_all(self) -> dict:
        """Full val and test evaluation, BN running stats and activation percentiles to TensorBoard."""
        step = self.progress.step
        record = {"step": step, **self.measure()}
        if self.cfg.probe.train_mode_acc:  # BN's train/eval gap: the test set with batch statistics
            record["test/acc_train_mode"] = train_mode_accuracy(
                self.model, self.data.test_x, self.data.test_y, self.cfg.train.batch_size)
        self.monitor.evaluation(step, eval_metrics(record), self.optimizer.param_groups[0]["lr"])
        self.monitor.running_stats(step, self.model.norm_layers())
        self.monitor.activations(step, self.model, self.probe)
        p = self.progress
        if p.loss_count:
            p.last_train_loss = p.loss_sum / p.loss_count
        p.loss_sum, p.loss_count = 0.0, 0
        p.evals.append(record)
        return record

    def fit(self) -> dict:
        """Train to cfg.train.steps (or divergence, or a signal); write and return summary.json."""
        p, t = self.progress, self.cfg.train
        if run_status(p, t.steps) in ("completed", "diverged"):
            log.info("%s already %s at step %d: nothing to do", self.run_dir, run_status(p, t.steps), p.step)
            self.monitor.close()
            return run_summary(p, self.cfg)
        wall_start = time.perf_counter() - p.wall_s
        bar = ProgressBar(t.steps, p.step, self.progress_mode)
        self.model.train()
        with StopFlag() as stop:
            if p.step == 0 and not p.evals:
                self._log_eval(self.evaluate_all(), bar)
            for end in segment_ends(p.step, t):
                self.record_losses(self.run_segment(end, stop, bar.tick))
                p.wall_s = time.perf_counter() - wall_start
                if p.diverged_at_step is not None or p.step < end:  # diverged, or a signal cut the segment
                    break
                if is_eval_point(end, t):
                    self._log_eval(self.evaluate_all(), bar)
                if is_checkpoint_point(end, t) and end < t.steps:  # the last one is _finish's
                    p.wall_s = time.perf_counter() - wall_start
                    self._checkpoint()
                # Let the event writer's thread finish this boundary's events here rather than
                # during the next segment, where it would compete with torch's threads for the
                # cores (a guard: alone it measured within noise; the activation histograms
                # it was tried with were the real 23% -> ~6% logging cost, see monitor.py).
                self.monitor.flush()
                if stop.signum is not None:  # after the boundary's work: a resume starts from a whole boundary
                    break
            bar.close()
            return self._finish(stop.signum, wall_start)

    def _finish(self, signum: int | None, wall_start: float) -> dict:
        """Settle the run: its final checkpoint, model.pt and hparams unless interrupted, summary.json."""
        p = self.progress
        status = run_status(p, self.cfg.train.steps)
        if status == "diverged" and p.evals[-1]["step"] != p.step:
            self.evaluate_all()  # final metrics describe the model as divergence left it
        # An interrupted run is not evaluated here: an extra eval would change its history, and
        # the resumed run must end with the same numbers as one never interrupted.
        p.wall_s = time.perf_counter() - wall_start
        self._checkpoint()
        summary = run_summary(p, self.cfg)
        if status != "interrupted":
            self.monitor.run_end(summary)  # steps to 95% and the HParams entry
            buffer = io.BytesIO()
            torch.save(self.model.state_dict(), buffer)
            atomic_write(self.run_dir / "model.pt", buffer.getvalue())
        self.monitor.close()
        write_json(self.run_dir / "summary.json", summary)
        if status == "interrupted":
            raise RunInterrupted(signum, summary)
        return summary

    def _log_eval(self, record: dict, bar: ProgressBar) -> None:
        p = self.progress
        rate = p.step / p.train_s if p.train_s > 0 else float("nan")
        bar.update(p.step, p.last_train_loss, record["test/acc"], rate)




def train(cfg: Config, run_dir: Path, progress: str = "auto") -> dict:
    """Train one run of `cfg` in run_dir (resuming from its checkpoint if any); return the summary.

    progress: auto (a tqdm bar on a terminal, else a log line per evaluation) | quiet (neither).
    """
    return Run(cfg, run_dir, progress).fit()
