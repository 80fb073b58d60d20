"""The fused dot interaction computes what TorchRec's InteractionArch computes."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from modules.interaction import LOW_PRECISION_MIN_DIM, dot_interaction, pair_indices

B, F, D = 32, 5, 8


def forward_backward(interaction, autocast: bool, dim: int = D):
    torch.manual_seed(0)
    dense = torch.randn(B, dim, requires_grad=True)
    values = torch.randn(B, F * dim, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = interaction(dense, list(values.split(dim, dim=1)))
    out.float().pow(2).sum().backward()
    return out, dense.grad, values.grad


def reference(dense, sparse):
    return InteractionArch(num_sparse_features=F)(dense, torch.stack(sparse, dim=1))


def bf16_rounded(fn):
    """``fn`` on the inputs rounded to bfloat16, computed in float32: what the fused
    interaction computes under bf16 autocast where its matmuls stay float32."""
    def rounded(dense, sparse):
        return fn(dense.bfloat16().float(), [piece.bfloat16().float() for piece in sparse])
    return rounded


def fused(dense, sparse):
    return dot_interaction(dense, sparse, pair_indices(F))


@pytest.mark.parametrize("dim", [D, LOW_PRECISION_MIN_DIM])
@pytest.mark.parametrize("autocast", [False, True])
def test_matches_interaction_arch(autocast, dim):
    expected = forward_backward(reference, autocast, dim)
    actual = forward_backward(fused, autocast, dim)
    assert actual[0].dtype == expected[0].dtype
    assert actual[0].shape == (B, dim + F * (F + 1) // 2)
    if autocast and dim < LOW_PRECISION_MIN_DIM:
        # InteractionArch multiplies in bf16 under autocast; at small dims the fused one
        # multiplies the same bf16-rounded inputs in float32, rounding only its output:
        # compare with that, up to the output's bf16 rounding (2^-8 relative), which reaches
        # the gradients through it.
        expected = forward_backward(bf16_rounded(reference), False, dim)
        tolerance = {"atol": 1e-2, "rtol": 2e-2}
    elif autocast:  # both multiply in bf16: the same values up to bf16 rounding
        tolerance = {"atol": 5e-2, "rtol": 2e-2}
    else:  # float32: the same values up to summation order
        tolerance = {"atol": 1e-5, "rtol": 1e-5}
    for name, got, want in zip(("output", "dense grad", "sparse grad"), actual, expected):
        torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_many_features_in_chunks_and_group_blocks_match_interaction_arch(monkeypatch, autocast):
    """Many features, the square made a few samples at a time (a batch that is no multiple of
    the chunk), the features handed over as blocks of several features each."""
    import modules.interaction as interaction

    num_features, batch = 40, 23
    # Chunks of 3 samples: 8 chunks, the last one of 2.
    monkeypatch.setattr(interaction, "_CHUNK_BYTES", 3 * 4 * (num_features + 1) ** 2)
    assert interaction.chunk_samples(num_features) == 3
    torch.manual_seed(0)
    dense = torch.randn(batch, D, requires_grad=True)
    values = torch.randn(batch, num_features * D, requires_grad=True)
    weights = torch.randn(batch, D + num_features * (num_features + 1) // 2)

    def run(fn, pieces):
        dense.grad = values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(dense, pieces)
        (out.float() * weights).sum().backward()
        return out.float(), dense.grad.clone(), values.grad.clone()

    arch = InteractionArch(num_sparse_features=num_features)

    def reference(dense, sparse):
        if autocast:  # as in test_matches_interaction_arch
            dense, sparse = dense.bfloat16().float(), [s.bfloat16().float() for s in sparse]
        with torch.autocast("cpu", enabled=False):
            return arch(dense, torch.stack(sparse, dim=1))

    expected = run(reference, list(values.split(D, dim=1)))
    # Uneven blocks: 3 features, 1, then 36.
    blocks = list(values.split([3 * D, D, 36 * D], dim=1))
    actual = run(lambda d, s: dot_interaction(d, s, pair_indices(num_features)), blocks)
    tolerance = {"atol": 1e-2, "rtol": 2e-2} if autocast else {"atol": 1e-4, "rtol": 1e-5}
    for name, got, want in zip(("output", "dense grad", "sparse grad"), actual, expected):
        torch.testing.assert_close(got, want, **tolerance, msg=name)
