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
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.batch import Batch
from train.config import Config, register_configs
from train.run import to_config

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

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


def compose_config(overrides: list[str]) -> Config:
    """The typed config that ``python -m train <overrides>`` would run."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_config(cfg)


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
