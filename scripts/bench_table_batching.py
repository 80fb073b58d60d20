"""Time fbgemm's fused CPU embedding kernel for many small tables against the same lookups in
one stacked table.

    python scripts/bench_table_batching.py --tables 32 --rows 10000 --dim 16 --batch 2048

TorchRec puts the tables of a sharded collection that share a dim, optimizer and sharding
into one table-batched kernel (fbgemm's SplitTableBatchedEmbeddingBagsCodegen, one call for
all of them), as here. Inside the kernel the CPU backward with row-wise Adagrad still works
table by table: a CSR-to-CSC sort and a parallel update per table, and for a table read by
one feature it takes a different code path than for a table several features read. The
stacked case is one table of tables x rows rows that every feature reads at its own row
offset: the same rows, lookups and updates (rows of different features never meet), in one
pass. Each figure is the least CPU time of the calling thread over ``--repeats`` steps: with
one thread (the default), all of the kernel's work, whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    SplitTableBatchedEmbeddingBagsCodegen,
)


def step_milliseconds(tables: int, features: int, rows: int, args) -> tuple[float, float]:
    """(forward, backward) ms of a kernel with ``tables`` tables of ``rows`` rows read by
    ``features`` features (consecutive features share a table when there are fewer tables)."""
    kernel = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * tables,
        feature_table_map=[feature * tables // features for feature in range(features)],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        pooling_mode=PoolingMode.SUM,
    )
    generator = torch.Generator().manual_seed(0)
    per_feature_rows = rows * tables // features
    # Each feature's IDs in its own range of rows, uniform, one ID per sample.
    indices = torch.cat([
        feature % (features // tables) * per_feature_rows
        + torch.randint(0, per_feature_rows, (args.batch,), generator=generator)
        for feature in range(features)
    ])
    offsets = torch.arange(features * args.batch + 1)
    gradient = torch.ones(args.batch, features * args.dim)
    forward = backward = float("inf")
    for _ in range(args.repeats + 1):
        started = time.thread_time()
        pooled = kernel(indices, offsets)
        middle = time.thread_time()
        pooled.backward(gradient)
        ended = time.thread_time()
        forward, backward = min(forward, middle - started), min(backward, ended - middle)
    return 1000 * forward, 1000 * backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=32)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    separate = step_milliseconds(args.tables, args.tables, args.rows, args)
    stacked = step_milliseconds(1, args.tables, args.rows * args.tables, args)
    print(json.dumps({**vars(args),
                      "separate_forward_ms": round(separate[0], 2),
                      "separate_backward_ms": round(separate[1], 2),
                      "stacked_forward_ms": round(stacked[0], 2),
                      "stacked_backward_ms": round(stacked[1], 2)}))


if __name__ == "__main__":
    main()
