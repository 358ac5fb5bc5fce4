"""Which runs of a sweep can share a group (one stacked model, bnexp/run/loop.py), and in what sizes."""

from __future__ import annotations

import logging
import math

from bnexp.config import Config, ConfigError, flatten
from bnexp.nn.registry import variant

log = logging.getLogger(__name__)

# What may differ between the members of one group: each member keeps its own value of these.
# Everything else (shapes, norm, optimizer kind, steps, batch size, schedules, probes, data,
# device, threads) is shared, because the members take their steps together in one model.
MEMBER_KEYS = (
    "seed",             # own init, batch order and noise
    "optim.lr",         # a (K, 1) column in the stacked update
    "optim.momentum",   # likewise (SGD)
    "model.init_std",   # only the init: each member is built as its solo run
    "name",             # a label in summary.json
    "train.log_every",  # each member writes its own TensorBoard
    "train.tensorboard",
    "train.resume",     # each member looks at its own checkpoint
)


def group_key(cfg: Config) -> tuple:
    """What all members of a group must share: the flattened config without MEMBER_KEYS."""
    return tuple(sorted((k, v) for k, v in flatten(cfg).items() if k not in MEMBER_KEYS))


def solo_reason(cfg: Config) -> str | None:
    """Why this run cannot share a group and trains alone, or None when it can.

    The one list of what is not batched: a norm whose registry entry has no stacked form
    (bnexp/nn/registry.py). Every norm bnexp ships has one, in either position, with or
    without probes; the list is kept for a norm added without one.
    """
    if variant(cfg.norm.name).stack is None:
        return f"norm={cfg.norm.name} (its registry entry has no stacked form)"
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
    the second on one core; 6 groups of 12-13 run in three full rounds, which was faster although
    a group of 13 takes fewer model-steps per second than one of 25
    (docs/results/measurements.md#balanced-groups). If no cap in that range balances, max_batch.
    """
    if processes > 1:
        for cap in range(max_batch, (max_batch + 1) // 2 - 1, -1):
            if sum(math.ceil(n / cap) for n in class_sizes) % processes == 0:
                return cap
    return max_batch
