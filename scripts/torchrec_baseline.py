"""The yardstick: a minimal DLRM loop built only from TorchRec's own pieces.

TorchRec's DLRM + DistributedModelParallel + TrainPipelineSparseDist on TorchRec's random
data, with no metrics, no logging and no hashing, in the reference shape (26 tables x 100,000
rows x 64 dims, one ID per feature, 13 dense features, dense arch 256-64, over arch
256-128-1, batch 2048 per rank, fused row-wise Adagrad). Prints one JSON line with the global
samples/s measured after a warm-up. Run it beside hashrec's own job on the same machine:

    torchrun --standalone --nproc_per_node 2 scripts/torchrec_baseline.py --steps 300
    torchrun --standalone --nproc_per_node 2 -m train experiment=reference_shape
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
from torchrec import EmbeddingBagCollection
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.cpu_affinity import pin_local_rank  # noqa: E402
from train.sharding import CpuRowWiseSharder  # noqa: E402  (row-wise allowed on CPU too)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--num-tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--pin-cores", action="store_true",
                        help="pin each CPU rank to its own cores (what hashrec's "
                             "trainer.cpu_affinity=auto does), for a like-for-like comparison")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.pin_cores and device.type == "cpu":
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        pin_local_rank(int(os.environ.get("LOCAL_RANK", rank)), local_world_size)

    keys = [f"f{i}" for i in range(args.num_tables)]
    tables = [
        EmbeddingBagConfig(name=f"t_{key}", embedding_dim=args.dim, num_embeddings=args.rows,
                           feature_names=[key])
        for key in keys
    ]
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
            dense_in_features=13,
            dense_arch_layer_sizes=[256, args.dim],
            over_arch_layer_sizes=[256, 128, 1],
            dense_device=device,
        )
    )
    apply_optimizer_in_backward(
        RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": args.lr, "eps": 1e-8}
    )
    sharder = CpuRowWiseSharder()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        batch_size=args.batch_size,
    )
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    model = DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=args.lr, eps=1e-8),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(model, optimizer, device)
    data = iter(
        RandomRecDataset(keys=keys, batch_size=args.batch_size, hash_size=args.rows,
                         ids_per_feature=1, num_dense=13, manual_seed=rank)
    )
    for _ in range(args.warmup):
        pipeline.progress(data)
    started = time.perf_counter()
    for _ in range(args.steps):
        pipeline.progress(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rate = torch.tensor([args.steps * args.batch_size / seconds], dtype=torch.float64)
    dist.all_reduce(rate)  # per-rank rates summed: global samples/s
    if rank == 0:
        print(json.dumps({"job": "torchrec_baseline", "world_size": world_size,
                          "samples_per_sec": float(rate), "steps": args.steps,
                          "batch_size_per_rank": args.batch_size}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
