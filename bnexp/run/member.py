"""One run of the training loop: its dir, config, model, optimizer, data order, history and outputs.

A `Member` is what a run *is*, whoever takes its steps: a solo run is the loop with one member,
a batched group the loop with K (bnexp/run/loop.py). It builds its model as a solo run builds
it (same seed, same init, same noise generators), resumes from its dir's checkpoint, and writes
everything a run dir holds (docs/design.md#run-dir): TensorBoard events, checkpoint.pt,
model.pt and summary.json. Between boundaries an engine may hold its tensors (a stacked model);
at a boundary the engine has put them back into `model` and `optimizer` (bnexp/run/engine.py).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bnexp.run import checkpoint as ckpt
from bnexp.run.atomic import atomic_write, write_json
from bnexp.config import Config, ConfigError, flatten, resolve_data_root
from bnexp.run.data import MNIST, load_mnist
from bnexp.nn.model import MLP, init_weights
from bnexp.run.monitor import make_monitor
from bnexp.nn.noise import seed_noise
from bnexp.run.probes import train_mode_accuracy
from bnexp.run.order import BatchOrder
from bnexp.run.summary import Progress, Summary, run_status, run_summary
from bnexp.run.runtime import choose_device

log = logging.getLogger("bnexp.run")

PROBE_SIZE = 1000  # test images whose pre-activations give the act/ percentiles


@dataclass
class Outcome:
    """What a member ended with: its summary (status completed, diverged or interrupted), the
    signal that interrupted it, or the one-line user error that stopped its group."""

    summary: Summary | None
    signum: int | None = None
    error: str | None = None


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """SGD (with optional momentum) or Adam, from the optim config group (validated: sgd or adam)."""
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.Adam(params, lr=cfg.optim.lr)


def build_model(cfg: Config) -> MLP:
    """The run's MLP with its initial weights (N(0, init_std) from the seed) and noise generators."""
    n = cfg.norm
    model = MLP(cfg.model.widths, cfg.model.activation, n, position=n.position)
    init_weights(model, cfg.model.init_std, torch.Generator().manual_seed(cfg.seed))
    seed_noise(model, cfg.seed)  # norm=custom_noisy only: its generators, before a resume restores them
    return model


def load_data(cfg: Config, device: torch.device) -> MNIST:
    """The data, and train.batch_size's upper bound: the images left for training, known only now."""
    d = cfg.data
    data = load_mnist(resolve_data_root(d.root), val_size=d.val_size, normalize=d.normalize,
                      device=device, verify=d.verify)
    n = len(data.train_x)
    if cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not allowed: "
                          f"at most the training set size, {n} images")
    return data


class Member:
    """One run: built (or resumed) from its config and dir, recorded and finished by the loop."""

    def __init__(self, cfg: Config, run_dir: Path, data: MNIST | None = None,
                 device: torch.device | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.flat = flatten(cfg)
        self.device = choose_device(cfg).device if device is None else device  # a group's: the loop's choice
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved = None if cfg.train.resume == "never" else ckpt.load_checkpoint(self.run_dir, self.flat)
        self.data = load_data(cfg, self.device) if data is None else data
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.order = BatchOrder(len(self.data.train_x), cfg.train.batch_size, cfg.seed, self.device)
        self.progress = Progress()
        if saved is not None:
            self.progress = Progress(**ckpt.restore(saved, self.model, self.optimizer, self.order))
            log.info("resuming from %s at step %d", self.run_dir / ckpt.CHECKPOINT, self.progress.step)
        # The global RNG state a solo run checkpoints (seeded, then advanced by building the
        # model); nothing in training draws from it, and members of one process share it.
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        purge = self.progress.step + 1 if saved is not None else 0
        self.monitor = make_monitor(self.run_dir, purge, cfg.train.tensorboard)
        self.probe_images = self.data.test_x[:PROBE_SIZE]
        self.wall_start = 0.0  # set by the loop: perf_counter() at which wall_s was 0

    @property
    def status(self) -> str:
        return run_status(self.progress, self.cfg.train.steps)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def summary(self) -> Summary:
        return run_summary(self.progress, self.cfg.norm.name, self.cfg.seed, self.cfg.train.steps, self.flat)

    # -- what the loop records ---------------------------------------------------------------

    def record_losses(self, first: int, values: list[float]) -> None:
        """Log a segment's losses (steps first, first + 1, ...), update the running mean, and note
        the step of the first non-finite loss."""
        p = self.progress
        self.monitor.train_losses(first, values, self.cfg.train.log_every)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                p.diverged_at_step = first + i
                log.warning("loss is %s at step %d: the run diverged (recorded, not an error)", value, first + i)
                return
            p.loss_sum += value
            p.loss_count += 1

    def record_probes(self, probes: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
        """Write a segment's probe values (bnexp/run/probes.py): one host sync for all of them."""
        if not probes:
            return
        tags = list(probes[0][1])
        rows = torch.stack([torch.stack([v[t].float() for t in tags]) for _, v in probes]).tolist()
        for (step, _), row in zip(probes, rows):
            self.monitor.probes(step, dict(zip(tags, row)))

    def record_evaluation(self, metrics: dict[str, float]) -> dict:
        """An evaluation at the current step: metrics measured by the engine, plus what needs this
        member's own model (train-mode accuracy, running statistics, activation percentiles)."""
        step = self.progress.step
        record = {"step": step, **metrics}
        # BN's train/eval gap: the test set with batch statistics, wherever the test set is measured
        # (once, at the end, unless train.test_every asks for more). Cost: one pass per batch of
        # train.batch_size on this member's own model, 5,000 passes at batch 2.
        if self.cfg.probe.train_mode_acc and "test/acc" in metrics:
            record["test/acc_train_mode"] = train_mode_accuracy(
                self.model, self.data.test_x, self.data.test_y, self.cfg.train.batch_size)
        self.monitor.evaluation(step, {k: v for k, v in record.items() if k != "step"}, self.lr)
        self.monitor.running_stats(step, self.model.norm_layers())
        self.monitor.activations(step, self.model, self.probe_images)
        p = self.progress
        if p.loss_count:
            p.last_train_loss = p.loss_sum / p.loss_count
        p.loss_sum, p.loss_count = 0.0, 0
        p.evals.append(record)
        return record

    # -- what it writes ----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Flush TensorBoard, then atomically save model, optimizer, RNGs, data order and history."""
        self.monitor.flush()
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state_all(self.rng[1])
        ckpt.save_checkpoint(self.run_dir, config=self.flat, model=self.model, optimizer=self.optimizer,
                             order=self.order, progress=asdict(self.progress))

    def finish(self, signum: int | None) -> Outcome:
        """Settle the run: its final checkpoint, model.pt and HParams unless interrupted, summary.json.

        An interrupted run is not evaluated here: an extra evaluation would change its history,
        and the resumed run must end with the same numbers as one never interrupted.
        """
        self.progress.wall_s = time.perf_counter() - self.wall_start
        self.checkpoint()
        summary = self.summary()
        if summary["status"] != "interrupted":
            self.monitor.run_end(summary)  # steps to 95% and the HParams entry
            buffer = io.BytesIO()
            torch.save(self.model.state_dict(), buffer)
            atomic_write(self.run_dir / "model.pt", buffer.getvalue())
        self.monitor.close()
        write_json(self.run_dir / "summary.json", summary)
        return Outcome(summary, signum=signum if summary["status"] == "interrupted" else None)

    def close_done(self) -> Outcome:
        """A run found already completed or diverged: nothing to train, its summary as it was."""
        log.info("%s already %s at step %d: nothing to do", self.run_dir, self.status, self.progress.step)
        self.monitor.close()
        return Outcome(self.summary())
