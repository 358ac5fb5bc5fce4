"""The seed's three graded checks (a seminar on the batch-norm layer), run against our API.

The seed compared with torch.allclose and, for its step 3, atol=0.5 because its own class
normalized with the running statistics in training. Here every step uses
assert_close's default tolerances.
"""
from __future__ import annotations

import torch
from torch.testing import assert_close

from bnexp.layers import BatchNorm1d, batch_norm


def test_step1_no_affine_training_every_eps():
    """beta = 0, gamma = 1, training only; the seed's fixed input, eps = 10**-k for k = 0..9."""
    input_tensor = torch.tensor([[0.0, 0, 1, 0, 2], [0, 1, 1, 0, 10]])
    reference = torch.nn.BatchNorm1d(input_tensor.shape[1], affine=False)
    ours = BatchNorm1d(input_tensor.shape[1], affine=False)
    for eps_power in range(10):
        eps = 10.0**-eps_power
        reference.eps = eps
        ours.eps = eps
        expected = reference(input_tensor)
        assert ours(input_tensor).shape == expected.shape
        assert_close(ours(input_tensor), expected)
        functional = batch_norm(input_tensor, None, None, training=True, eps=eps)
        assert_close(functional, expected)


def test_step2_given_weight_and_bias():
    """Batch 5 x 7 of randn, eps = 1e-3, random weight and bias, training mode."""
    torch.manual_seed(2)
    input_size, batch_size, eps = 7, 5, 1e-3
    input_tensor = torch.randn(batch_size, input_size)
    reference = torch.nn.BatchNorm1d(input_size, eps=eps)
    reference.bias.data = torch.randn(input_size)
    reference.weight.data = torch.randn(input_size)
    expected = reference(input_tensor)
    ours = batch_norm(
        input_tensor, None, None, reference.weight.data, reference.bias.data, training=True, eps=eps
    )
    assert ours.shape == expected.shape
    assert_close(ours, expected)


def test_step3_full_class_train_then_eval():
    """momentum 0.5, eps 1e-5, batch 5 x 3: two training batches, eval(), two more batches.

    Normalize with the biased batch variance; smooth the unbiased one into running_var.
    """
    torch.manual_seed(3)
    input_size, batch_size, eps = 3, 5, 1e-5
    reference = torch.nn.BatchNorm1d(input_size, eps=eps)
    reference.bias.data = torch.randn(input_size)
    reference.weight.data = torch.randn(input_size)
    reference.momentum = 0.5
    ours = BatchNorm1d(input_size, eps=eps, momentum=0.5)
    with torch.no_grad():
        ours.weight.copy_(reference.weight)
        ours.bias.copy_(reference.bias)
    for phase in ("train", "eval"):
        if phase == "eval":
            reference.eval()
            ours.eval()
        for _ in range(2):
            torch_input = torch.randn(batch_size, input_size)
            assert_close(ours(torch_input), reference(torch_input))
            assert_close(ours.running_mean, reference.running_mean)
            assert_close(ours.running_var, reference.running_var)
            assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item()
