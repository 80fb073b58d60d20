"""DLRM's dot interaction as one autograd function, a cache-sized chunk of samples at a time.

The same values as ``torchrec.models.dlrm.InteractionArch`` (the dense vector, then the dots
of every pair of [dense, sparse...] in its ``triu_indices`` order), computed with fewer passes
over memory:

* The inputs (the dense vector and the pooled features, as per-feature tensors or whole group
  blocks) are written once into one [B, F + 1, D] block, rounded to the compute dtype as
  autocast would round the matmul's operands; no stack, cat or cast of the whole block.
* The square X Xᵀ of all products, [B, F + 1, F + 1], is made ``chunk_samples`` samples at a
  time, and only its upper triangle (the pairs) leaves the chunk, gathered straight into the
  output. With many features the square dwarfs everything else (F = 258: 268 KB a sample,
  550 MB at B = 2048): written whole, gathered from, then zero-filled and scattered into
  again in backward, it made the interaction most of the step. A chunk that fits in the
  core's cache keeps the gather and the scatter cache-local.
* Backward scatters the pairs' gradient G into a chunk's upper triangle once and computes
  d(X Xᵀ)/dX = (G + Gᵀ) X as G X + Gᵀ X.
* Under autocast the matmuls run in bf16 only where that pays (``matmul_dtype``).

``scripts/bench_interaction.py`` times it against InteractionArch (docs/performance.md).
"""

from __future__ import annotations

import torch

# Bytes of the [chunk, F + 1, F + 1] float32 products (or their gradient) made at once: half
# the per-core L2 cache of the dev machines (2 MB), so that the gather of the upper triangle
# (forward) and the scatter of its gradient (backward) read and write cached memory. At F =
# 258 (3 samples a chunk) 1 MB was about 10% faster than 4 MB and 30% faster than 16 MB; the
# dispatch of a chunk's few ops is a few percent of its work.
_CHUNK_BYTES = 1 << 20


def pair_indices(num_sparse_features: int) -> torch.Tensor:
    """Flat indices into a [(F + 1) x (F + 1)] matrix of InteractionArch's pairs, in its
    order (``triu_indices(offset=1)``: i < j, row-major), so the pairs of Z are
    ``Z.view(B, -1).index_select(1, indices)``."""
    size = num_sparse_features + 1
    rows, cols = torch.triu_indices(size, size, offset=1)
    return rows * size + cols


def chunk_samples(num_sparse_features: int) -> int:
    """Samples per chunk: as many as keep the chunk's float32 products within _CHUNK_BYTES."""
    size = num_sparse_features + 1
    return max(1, _CHUNK_BYTES // (4 * size * size))


# The smallest embedding dim whose interaction matmuls run in the autocast dtype.
LOW_PRECISION_MIN_DIM = 32


def matmul_dtype(compute_dtype: torch.dtype, dim: int) -> torch.dtype:
    """The dtype of the interaction's batched matmuls: the compute dtype (bf16 under autocast)
    from ``LOW_PRECISION_MIN_DIM`` dims up, else float32.

    The gather and the scatter run in float32 either way (CPU gathers and scatters on bfloat16
    are 3-4x slower than a cast plus the float32 kernel), so low-precision matmuls cost a cast
    of each chunk's square both ways, and save about D multiply-adds per element of it: at
    D = 64 (the reference shape) bf16 matmuls were 15% faster, at D = 16 (258 features) 12%
    slower than float32 ones (scripts/bench_interaction.py, one thread).
    """
    return compute_dtype if dim >= LOW_PRECISION_MIN_DIM else torch.float32


class _DotInteraction(torch.autograd.Function):
    """The inputs are rounded to the compute dtype (as autocast rounds a matmul's operands),
    multiplied in ``matmul_dtype``, gathered and scattered in float32; the output takes the
    compute dtype (or the dense vector's, if wider), as InteractionArch's does.

    ``pieces``: 2-D tensors [B, k D], k consecutive features each (a whole feature group's
    pooled block, or one feature), in feature order.
    """

    @staticmethod
    def forward(ctx, indices, dtype, dense, *pieces):
        batch_size, dim = dense.shape
        size = 1 + sum(piece.shape[1] for piece in pieces) // dim
        # [B, F + 1, D], written once, of inputs rounded to the compute dtype.
        combined = torch.empty(
            batch_size, size, dim, dtype=matmul_dtype(dtype, dim), device=dense.device
        )
        flat = combined.view(batch_size, size * dim)
        column = 0
        for piece in (dense, *pieces):
            if combined.dtype != dtype:
                piece = piece.to(dtype)
            flat[:, column : column + piece.shape[1]].copy_(piece)
            column += piece.shape[1]
        # Promotes as InteractionArch's final cat does: the dense vector's dtype or wider.
        output = torch.empty(
            batch_size, dim + indices.numel(), dtype=torch.promote_types(dense.dtype, dtype),
            device=dense.device,
        )
        output[:, :dim].copy_(dense)
        pairs = output[:, dim:]
        chunk = chunk_samples(size - 1)
        for start in range(0, batch_size, chunk):
            block = combined[start : start + chunk]
            count = block.shape[0]
            products = torch.bmm(block, block.transpose(1, 2)).view(count, -1).float()
            # Gather straight into the output's columns (index_select's out= is slow on a
            # strided view); another output dtype takes one cast of the kept half.
            index = indices.expand(count, -1)
            if output.dtype == torch.float32:
                torch.gather(products, 1, index, out=pairs[start : start + count])
            else:
                pairs[start : start + count].copy_(torch.gather(products, 1, index))
        ctx.save_for_backward(combined, indices)
        ctx.input_dtypes = (dense.dtype, [piece.dtype for piece in pieces])
        ctx.widths = [piece.shape[1] for piece in pieces]
        return output

    @staticmethod
    def backward(ctx, grad_output):
        combined, indices = ctx.saved_tensors
        dense_dtype, piece_dtypes = ctx.input_dtypes
        batch_size, size, dim = combined.shape
        chunk = chunk_samples(size - 1)
        # The gradient G of the pairs put in the upper triangle of a square; only those
        # places are ever written, so the chunk buffer is zeroed once and reused. Then
        # (G + Gᵀ) X as G X + Gᵀ X: a second small matmul costs less than scattering every
        # pair's gradient a second time, to its mirror place.
        upper = torch.zeros(min(chunk, batch_size), size * size, device=combined.device)
        grad_combined = torch.empty_like(combined)
        for start in range(0, batch_size, chunk):
            count = min(chunk, batch_size - start)
            square = upper[:count]
            square.index_copy_(1, indices, grad_output[start : start + count, dim:].float())
            square = square.view(count, size, size).to(combined.dtype)
            block = combined[start : start + count]
            grad_block = torch.bmm(square, block, out=grad_combined[start : start + count])
            grad_block.baddbmm_(square.transpose(1, 2), block)
        flat = grad_combined.view(batch_size, size * dim)
        grad_dense = (grad_output[:, :dim] + flat[:, :dim]).to(dense_dtype)
        grad_pieces = []
        column = dim
        for width, piece_dtype in zip(ctx.widths, piece_dtypes):
            grad_pieces.append(flat[:, column : column + width].to(piece_dtype))
            column += width
        return (None, None, grad_dense, *grad_pieces)


def dot_interaction(
    dense: torch.Tensor, sparse: list[torch.Tensor], indices: torch.Tensor
) -> torch.Tensor:
    """[dense, pairwise dots] as InteractionArch computes them.

    Args:
        dense: [B, D].
        sparse: the F pooled features in order as 2-D pieces of one dtype, each [B, k D] for
            k consecutive features (one piece per feature, or a whole group's block; views
            are fine).
        indices: ``pair_indices(F)``.

    Returns [B, D + F(F + 1)/2], in the wider of dense's dtype and the compute dtype (the
    autocast dtype when autocast is on), as InteractionArch returns it.
    """
    device_type = dense.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(dense.dtype, sparse[0].dtype)
    with torch.autocast(device_type, enabled=False):
        return _DotInteraction.apply(indices, dtype, dense, *sparse)
