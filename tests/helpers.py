"""Shared test helpers: composing the real Hydra config, spawning gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.batch import Batch
from train.compose import CONF_DIR, compose_config  # noqa: F401  (tests import both from here)
from train.config import Config

REPO = Path(__file__).resolve().parents[1]

# A model small enough for tests that still has several groups, multi-hot bags, and tables
# that every sharding type can split (dims divisible by 4, rows > world size).
TINY = [
    "features.embedding_dim=8",
    "features.groups.user.features.user_id.num_embeddings=64",
    "features.groups.user.features.user_interests.num_embeddings=40",
    "features.groups.ad.features.ad_id.num_embeddings=48",
    "features.groups.ad.features.advertiser_id.num_embeddings=32",
    "features.groups.context.features.site_id.num_embeddings=24",
    "model.dense_layer_sizes=[16,8]",
    "model.over_layer_sizes=[16,1]",
    "trainer.batch_size=16",
    "data.eval_batches=2",
    "logger.mode=disabled",
    # Exact comparisons (sharded vs single process, resume vs straight) in float32; the
    # bf16 dense path has tests of its own.
    "trainer.precision=fp32",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real gloo processes."""
    mp.start_processes(
        _worker, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn"
    )


def concat_batches(batches: list[Batch]) -> Batch:
    """Stack per-rank batches into the global batch a single process would see."""
    groups = batches[0].sparse_features.keys()
    sparse = {}
    for group in groups:
        keys = batches[0].sparse_features[group].keys()
        values, lengths = [], []
        for key in keys:
            for batch in batches:
                jagged = batch.sparse_features[group][key]
                values.append(jagged.values())
                lengths.append(jagged.lengths())
        sparse[group] = KeyedJaggedTensor(
            keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
        )
    return Batch(
        dense_features=torch.cat([b.dense_features for b in batches]),
        sparse_features=sparse,
        labels=torch.cat([b.labels for b in batches]),
    )


def run_train(args: list[str], cwd: Path, timeout: int = 600, launcher: list[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m train`` (or ``launcher -m train``) in a subprocess, outputs under cwd."""
    command = (launcher or [sys.executable]) + ["-m", "train", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def train_sharded(config: Config, groups: list, rank: int, world_size: int, steps: int):
    """Build the sharded job on this rank and train ``steps`` planted batches through
    TorchRec's pipeline; returns (job, pipeline, global mean loss per step). A collective."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from train.build import build_sharded_job
    from train.data import planted_data
    from train.distributed import DistributedContext

    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    job = build_sharded_job(config, groups, context)
    data = planted_data(config, groups)
    pipeline = TrainPipelineSparseDist(
        job.model, job.optimizer, torch.device("cpu"), pipeline_postproc=True
    )
    batches = iter([data.batch("train", rank, step)[0] for step in range(steps)])
    losses = []
    for _ in range(steps):
        loss, _, _ = pipeline.progress(batches)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(float(global_loss) / world_size)
    return job, pipeline, losses


def train_unsharded(config: Config, groups: list, world_size: int, steps: int) -> dict:
    """The single-process reference: the unsharded model fed the global batch (every rank's
    batch of a step, concatenated) with plain SGD at the config's embedding and dense lrs.
    Returns {"losses", "tables"} (the sharded run must match both)."""
    from train.build import build_click_model, embedding_parameters, init_tables
    from train.data import planted_data
    from train.tables import local_table_blocks

    model = build_click_model(config, groups, torch.device("cpu"))
    init_tables(model, groups, config.trainer.seed)
    embedding_params = embedding_parameters(model)
    embedding_ids = {id(p) for p in embedding_params}
    dense_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    optimizer = torch.optim.SGD(
        [
            {"params": embedding_params, "lr": config.optim.embedding_lr},
            {"params": dense_params, "lr": config.optim.dense_lr},
        ]
    )
    data = planted_data(config, groups)
    losses = []
    for step in range(steps):
        batch = concat_batches([data.batch("train", rank, step)[0] for rank in range(world_size)])
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tables = {b.table_name: b.tensor.detach().clone() for b in local_table_blocks(model)}
    return {"losses": losses, "tables": tables}


def full_tables(model: torch.nn.Module, sizes: dict[str, tuple[int, int]], rank: int) -> dict:
    """Every table assembled from all ranks' blocks (a collective)."""
    from train.tables import local_table_blocks

    tables = {name: torch.zeros(rows, dim) for name, (rows, dim) in sizes.items()}
    for block in local_table_blocks(model):
        if block.replicated and rank != 0:
            continue
        rows, cols = block.tensor.shape
        tables[block.table_name][
            block.row_offset : block.row_offset + rows,
            block.column_offset : block.column_offset + cols,
        ] += block.tensor.detach()
    for tensor in tables.values():
        dist.all_reduce(tensor)
    return tables
