"""bnexp/monitor.py: the fast percentiles it logs are torch.nanquantile's, bit for bit."""

import math

import pytest
import torch

from bnexp.monitor import nanquantile

Q = torch.tensor([0.15, 0.5, 0.85])  # the act/ percentiles (bnexp/tags.py)


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
