"""bnexp/run/monitor.py: the fast percentiles it logs are torch.nanquantile's, bit for bit; a new
event file sorts after the run dir's earlier ones, so a resumed curve stays continuous."""

import math
import socket
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.run.monitor import Monitor, nanquantile

Q = torch.tensor([0.15, 0.5, 0.85])  # the act/ percentiles (bnexp/run/tags.py)


def samples():
    """Inputs a run's pre-activations can be: any size, scale, ties, NaN and +-inf (a diverging net)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 2_000 if trial % 2 else 150_000, (1,), generator=gen))
        z = torch.randn(n, generator=gen) * 10 ** (6 * torch.rand(1, generator=gen).item() - 3)
        if trial % 3 == 0:
            z[torch.rand(n, generator=gen) < 0.3] = math.nan
        if trial % 5 == 0:
            z[torch.rand(n, generator=gen) < 0.01] = math.inf
        if trial % 11 == 0:
            z[torch.rand(n, generator=gen) < 0.01] = -math.inf
        if trial % 7 == 0:
            z = z.round()  # many ties
        yield z.view(-1, 1) if trial % 2 else z  # any shape: it is flattened


def test_equals_torch_nanquantile_bit_for_bit():
    for z in samples():
        mine, theirs = nanquantile(z, Q), torch.nanquantile(z.flatten(), Q)
        assert torch.equal(mine.isnan(), theirs.isnan()), (z.numel(), mine, theirs)
        assert torch.equal(mine.nan_to_num(), theirs.nan_to_num()), (z.numel(), mine, theirs)


@pytest.mark.parametrize("values", [[math.nan] * 5, [2.5], [math.nan, 3.0, math.nan]],
                         ids=["all-nan", "one-value", "one-finite"])
def test_edge_cases_as_torch(values):
    z = torch.tensor(values)
    mine, theirs = nanquantile(z, Q), torch.nanquantile(z, Q)
    assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(mine.nan_to_num(), theirs.nan_to_num())


# -- the event file's name: a resumed run's events sort after the run's earlier ones --------------

def event_files(run_dir):
    """The run dir's event files in the order TensorBoard reads them (sorted by name)."""
    return sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))


def later_name(seconds: int) -> str:
    """An event file name that a naive new one (now, this host, this pid) would sort before:
    seconds at or past now, and a pid and counter that compare high as text."""
    return f"events.out.tfevents.{seconds:010d}.{socket.gethostname()}.99999999.9"


@pytest.mark.parametrize("ahead", [0, 1000], ids=["same-second", "future-timestamp"])
def test_a_new_event_file_sorts_after_every_event_file_in_the_dir(tmp_path, ahead):
    """In the same second (counter 10 < 9 as text, another pid) or after a clock step back."""
    old = later_name(int(time.time()) + ahead)
    (tmp_path / old).write_bytes(b"")
    monitor = Monitor(tmp_path, purge_step=5)
    monitor.close()
    names = event_files(tmp_path)
    assert len(names) == 2 and names[0] == old
    assert int(names[1].split(".")[3]) > int(old.split(".")[3])  # later seconds: last whatever follows


def test_a_resume_stays_continuous_when_the_earlier_file_would_sort_last(tmp_path):
    """A real resume (purge_step): the killed process's file named so that a naive new one would
    sort before it; TensorBoard still reads one continuous curve, the resumed values after step 40."""
    first = Monitor(tmp_path, purge_step=0)
    for step in range(1, 61):
        first.scalar("val/acc", 1.0, step)
    first.close()
    (written,) = tmp_path.glob("events.out.tfevents.*")
    written.rename(tmp_path / later_name(int(time.time()) + 1000))
    resumed = Monitor(tmp_path, purge_step=41)
    for step in range(41, 51):  # stopped again before step 60: steps 51..60 of the first process are stale
        resumed.scalar("val/acc", 2.0, step)
    resumed.close()
    assert len(event_files(tmp_path)) == 2
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("val/acc")
    assert [e.step for e in events] == list(range(1, 51))
    assert [e.value for e in events] == [1.0] * 40 + [2.0] * 10
