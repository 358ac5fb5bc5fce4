"""What a run shows while it trains (issue 12): on a terminal a bar that moves between
evaluations and never shows nan; elsewhere one log line per evaluation."""

import fcntl
import io
import logging
import os
import pty
import re
import struct
import sys
import termios
import threading

from bnexp.run import progress
from bnexp.run.progress import ProgressBar
from bnexp.run.loop import train
from conftest import tiny_config


class Terminal:
    """A pseudo-terminal (80 columns) whose slave end stands in for stderr; the master end is
    drained by a thread so the writer never blocks on a full buffer."""

    def __init__(self):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the slave end closed
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        self.stream.close()
        self.reader.join(timeout=10)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", "replace")


def test_bar_moves_during_a_segment_on_a_terminal(tiny_mnist, tmp_path, monkeypatch):
    """One 200-step segment between the evaluations at 0 and 200: the terminal shows step counts in
    between (drawn by tick, not by an evaluation), the final loss and accuracy, and no nan."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    # draw at every step: the tiny run is over before a timed redraw would come
    # (its length: docs/results/measurements.md#test-timings)
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    cfg = tiny_config(tiny_mnist, "train.steps=200", "train.eval_every=200", "train.checkpoint_every=200")
    summary = train(cfg, tmp_path / "run", progress="auto")
    text = terminal.text()
    assert summary["status"] == "completed"
    counts = {int(n) for n in re.findall(r"\b(\d+)/200\b", text)}
    assert {0, 200} <= counts
    assert len([n for n in counts if 0 < n < 200]) >= 10, sorted(counts)
    assert "nan" not in text
    assert re.search(r"loss=\d\.\d{4}, val_acc=\d\.\d{4}", text)


def test_before_the_first_measured_value_the_bar_leaves_it_out():
    """The evaluation at step 0 knows the validation accuracy but no training loss or rate yet."""
    terminal = Terminal()
    bar = ProgressBar(100, 0, stream=terminal.stream)
    bar.update(0, float("nan"), 0.1, float("nan"))
    bar.close()
    text = terminal.text()
    assert "val_acc=0.1000" in text and "loss=" not in text and "nan" not in text


def test_off_a_terminal_one_log_line_per_evaluation(tiny_mnist, tmp_path, caplog):
    """Not a terminal (pytest captures stderr): no bar, one line per evaluation, "-" until measured."""
    cfg = tiny_config(tiny_mnist)  # 60 steps, evaluations at 0, 20, 40, 60
    with caplog.at_level(logging.INFO, logger="bnexp.run.progress"):
        train(cfg, tmp_path / "run", progress="auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "bnexp.run.progress"]
    assert [line.split()[1] for line in lines] == ["0/60", "20/60", "40/60", "60/60"]
    assert lines[0].startswith("step 0/60  train_loss -  val_acc 0.") and lines[0].endswith("- steps/s")
    assert all("nan" not in line for line in lines)
    assert re.match(r"step 60/60  train_loss \d\.\d{4}  val_acc \d\.\d{4}  \d+ steps/s", lines[-1])


def test_quiet_shows_nothing(tiny_mnist, tmp_path, caplog):
    cfg = tiny_config(tiny_mnist)
    with caplog.at_level(logging.INFO, logger="bnexp.run.progress"):
        train(cfg, tmp_path / "run", progress="quiet")
    assert not [r for r in caplog.records if r.name == "bnexp.run.progress"]
