"""Achieved memory bandwidth of the embedding lookup (forward + fused backward) against the
machine's memory-copy bandwidth, measured the same way (wall time of a torch op, warm).

    python scripts/embedding_bandwidth.py --threads 2

The embedding step is TorchRec's fused CPU kernel (fbgemm's table-batched embedding bag with
row-wise Adagrad applied in backward), sharded by DistributedModelParallel on one rank, in the
reference shape (26 tables x 100,000 rows x 64 dims, one ID per feature, batch 2048).
Bytes counted per step, each float32: forward reads one row per ID (B*F*D) and writes the
pooled outputs (B*F*D); backward reads the output gradient (B*F*D), reads and writes each
touched row (2*B*F*D) and its Adagrad state (2*B*F). Copy bandwidth: ``dst.copy_(src)`` of a
1 GiB buffer counts read + write. The ratio says how close the lookup runs to the memory
system's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec import EmbeddingBagCollection  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology  # noqa: E402
from torchrec.distributed.planner.types import ParameterConstraints  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.optim import RowWiseAdagrad  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from train.sharding import CpuRowWiseSharder  # noqa: E402


def copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * num_bytes * repeats / (time.perf_counter() - started)


def embedding_bandwidth(num_tables: int, rows: int, dim: int, batch: int, steps: int) -> float:
    keys = [f"f{i}" for i in range(num_tables)]
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows,
                                   feature_names=[k]) for i, k in enumerate(keys)],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.01})
    sharder = CpuRowWiseSharder()
    # Table-wise with the fused kernel, as the training job places these tables. (Left to
    # itself on one rank the planner may pick data_parallel, whose backward writes dense
    # gradients for every row of every table.)
    planner = EmbeddingShardingPlanner(
        Topology(world_size=1, compute_device="cpu"),
        batch_size=batch,
        constraints={f"t{i}": ParameterConstraints(sharding_types=["table_wise"]) for i in range(num_tables)},
    )
    plan = planner.collective_plan(ebc, [sharder], dist.group.WORLD)
    model = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    generator = torch.Generator().manual_seed(0)
    batches = [
        KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.randint(0, rows, (batch * num_tables,), generator=generator),
            lengths=torch.ones(batch * num_tables, dtype=torch.int32),
        )
        for _ in range(8)
    ]

    def step(features: KeyedJaggedTensor) -> None:
        pooled = model(features).values()
        pooled.backward(torch.ones_like(pooled))

    for features in batches[:2]:
        step(features)
    started = time.perf_counter()
    for index in range(steps):
        step(batches[index % len(batches)])
    seconds = (time.perf_counter() - started) / steps
    lookups = batch * num_tables
    step_bytes = 4 * (5 * lookups * dim + 2 * lookups)
    return step_bytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    lookup = embedding_bandwidth(26, 100_000, 64, 2048, args.steps)
    copy = copy_bandwidth()
    print(json.dumps({"threads": args.threads, "embedding_bytes_per_sec": lookup,
                      "copy_bytes_per_sec": copy, "fraction_of_copy": lookup / copy}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
