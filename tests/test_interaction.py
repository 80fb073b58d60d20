"""The fused dot interaction computes what TorchRec's InteractionArch computes."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from modules.interaction import dot_interaction, pair_indices

B, F, D = 32, 5, 8


def forward_backward(interaction, autocast: bool):
    torch.manual_seed(0)
    dense = torch.randn(B, D, requires_grad=True)
    values = torch.randn(B, F * D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = interaction(dense, list(values.split(D, dim=1)))
    out.float().pow(2).sum().backward()
    return out, dense.grad, values.grad


def reference(dense, sparse):
    return InteractionArch(num_sparse_features=F)(dense, torch.stack(sparse, dim=1))


def fused(dense, sparse):
    return dot_interaction(dense, sparse, pair_indices(F))


@pytest.mark.parametrize("autocast", [False, True])
def test_matches_interaction_arch(autocast):
    expected = forward_backward(reference, autocast)
    actual = forward_backward(fused, autocast)
    assert actual[0].dtype == expected[0].dtype
    assert actual[0].shape == (B, D + F * (F + 1) // 2)
    # float32: the same values up to summation order; bf16: up to bf16 rounding.
    tolerance = {"atol": 5e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    for name, got, want in zip(("output", "dense grad", "sparse grad"), actual, expected):
        torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=name)
