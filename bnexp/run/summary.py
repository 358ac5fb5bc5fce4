"""summary.json: the typed structure its writer (bnexp/run/member.py) and its readers share.

The contract (docs/design.md#summaryjson): status is decided by `run_status` and nowhere else;
`steps_to_val_acc[t]` is the first evaluated step whose validation accuracy reached t, else
None (every choice is made on validation); `final.test_*` come from the one evaluation of the
test set at the end of the run (None for a run interrupted before its end);
`mean_val_err` is the average validation error over steps 0..budget (an area under the curve,
bnexp/run/schedule.py); `train_steps_per_s` is training steps over the seconds spent in them (evaluation excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, get_args

from bnexp.run.schedule import mean_val_err

STEPS_TO_VAL_ACC_KEYS = ("0.90", "0.95", "0.97", "0.98")  # the keys of steps_to_val_acc: validation accuracies, as written
Status = Literal["completed", "diverged", "interrupted"]
STATUSES: tuple[Status, ...] = get_args(Status)  # every value of status, in this order


class Final(TypedDict, total=False):
    train_loss: float  # mean training loss since the evaluation before the last
    val_acc: float
    val_loss: float
    test_acc: float | None  # the test set's one evaluation, at the end: reported, never chosen on
    test_loss: float | None
    test_acc_train_mode: float  # only with probe.train_mode_acc=true


class Summary(TypedDict):
    status: Status
    norm: str
    seed: int
    steps_done: int
    diverged_at_step: int | None
    final: Final
    steps_to_val_acc: dict[str, int | None]  # keyed by STEPS_TO_VAL_ACC_KEYS
    mean_val_err: float | None  # area under the validation-error curve / budget (bnexp/run/schedule.py)
    wall_s: float
    train_steps_per_s: float | None
    config: dict[str, Any]  # the flattened config


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


def steps_to_val_acc(evals: list[dict]) -> dict[str, int | None]:
    """For each key, the first evaluated step whose validation accuracy reached it, else None."""
    reached: dict[str, int | None] = {}
    for t in STEPS_TO_VAL_ACC_KEYS:
        hits = [e["step"] for e in evals if e["val/acc"] >= float(t)]
        reached[t] = min(hits) if hits else None
    return reached


def run_status(p: Progress, steps: int) -> Status:
    """The run's status, decided here and nowhere else: diverged once a loss was not finite,
    completed once all `steps` are done, else interrupted (stopped short by a signal, or not yet resumed)."""
    if p.diverged_at_step is not None:
        return "diverged"
    return "completed" if p.step >= steps else "interrupted"


def run_summary(p: Progress, norm: str, seed: int, steps: int, config: dict[str, Any]) -> Summary:
    """summary.json: a pure function of the run's progress and its (flattened) config."""
    status, last = run_status(p, steps), p.evals[-1]
    test = last if "test/acc" in last else {}  # a finished run's last evaluation measured the test set
    final: Final = {"train_loss": p.last_train_loss, "val_acc": last["val/acc"], "val_loss": last["val/loss"],
                    "test_acc": test.get("test/acc"), "test_loss": test.get("test/loss")}
    if "test/acc_train_mode" in last:  # probe.train_mode_acc only
        final["test_acc_train_mode"] = last["test/acc_train_mode"]
    return {
        "status": status,
        "norm": norm,
        "seed": seed,
        "steps_done": p.diverged_at_step if status == "diverged" else p.step,
        "diverged_at_step": p.diverged_at_step,
        "final": final,
        "steps_to_val_acc": steps_to_val_acc(p.evals),
        "mean_val_err": mean_val_err(p.evals, steps, status == "diverged"),
        "wall_s": round(p.wall_s, 3),
        "train_steps_per_s": round(p.step / p.train_s, 1) if p.train_s > 0 else None,
        "config": config,
    }
