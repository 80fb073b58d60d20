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


def train_sharded(
    config: Config,
    groups: list,
    rank: int,
    world_size: int,
    steps: int,
    prepare: Callable[[Any], None] | None = None,
):
    """Build the sharded job on this rank and train ``steps`` planted batches through
    TorchRec's pipeline; returns (job, pipeline, outputs). ``prepare(job)`` runs between the
    build and the first step.

    ``outputs`` holds this rank's own per-step results, never reduced over ranks:
    ``losses`` (the mean over this rank's batch) and ``logits`` ([B] per step). Compare them
    rank by rank with ``train_unsharded``'s slices: an all-reduced loss agrees across ranks by
    construction and can hide one rank's wrong work."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from train.build import build_sharded_job
    from train.data import planted_data
    from train.distributed import DistributedContext

    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    job = build_sharded_job(config, groups, context)
    if prepare is not None:
        prepare(job)
    data = planted_data(config, groups)
    pipeline = TrainPipelineSparseDist(
        job.model, job.optimizer, torch.device("cpu"), pipeline_postproc=True
    )
    batches = iter([data.batch("train", rank, step)[0] for step in range(steps)])
    outputs: dict[str, list] = {"losses": [], "logits": []}
    for _ in range(steps):
        loss, logits, _ = pipeline.progress(batches)
        outputs["losses"].append(float(loss))
        outputs["logits"].append(logits.detach().clone())
    return job, pipeline, outputs


def gather_outputs(outputs: dict) -> dict:
    """Every rank's ``train_sharded`` outputs (a collective): ``losses`` [ranks, steps] and
    ``logits`` [ranks, steps, B]."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outputs)
    return {
        "losses": torch.tensor([o["losses"] for o in gathered], dtype=torch.float64),
        "logits": torch.stack([torch.stack(o["logits"]) for o in gathered]),
    }


def column_blocks(model: torch.nn.Module) -> dict[str, list[tuple[int, int]]]:
    """Table -> its column ranges [start, stop) over all ranks, for tables split into more
    than one column block (column-wise and table-column-wise shards). A collective."""
    from train.tables import local_table_blocks

    local = {
        (b.table_name, b.column_offset, b.column_offset + b.tensor.shape[1])
        for b in local_table_blocks(model)
        if not b.replicated
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    blocks: dict[str, set] = {}
    for name, start, stop in set().union(*gathered):
        blocks.setdefault(name, set()).add((start, stop))
    return {name: sorted(ranges) for name, ranges in blocks.items() if len(ranges) > 1}


class ColumnBlockRowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad with one accumulator per row *of each column block*, which is what
    fbgemm's fused row-wise Adagrad computes for a table split column-wise: each shard keeps
    its own state, the mean of squared gradients over its own columns only.

        state[r, k] += mean(g[r, block_k] ** 2)
        w[r, block_k] -= lr * g[r, block_k] / (sqrt(state[r, k]) + eps)

    With a single block it is TorchRec's RowWiseAdagrad (torchrec/optim/rowwise_adagrad.py).
    ``blocks``: per parameter (in order), its column ranges [start, stop)."""

    def __init__(self, params: list, blocks: list[list[tuple[int, int]]], lr: float, eps: float):
        super().__init__(params, {"lr": lr, "eps": eps})
        self.blocks = dict(zip(params, blocks))
        for param, ranges in self.blocks.items():
            self.state[param]["sum"] = torch.zeros(param.shape[0], len(ranges))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state_sum = self.state[param]["sum"]
                for k, (start, stop) in enumerate(self.blocks[param]):
                    grad = param.grad[:, start:stop]
                    state_sum[:, k] += grad.pow(2).mean(dim=1)
                    std = state_sum[:, k : k + 1].sqrt().add_(group["eps"])
                    param[:, start:stop].addcdiv_(grad, std, value=-group["lr"])


def reference_optimizers(
    config: Config, model: torch.nn.Module, blocks: dict[str, list[tuple[int, int]]]
) -> tuple[list[torch.optim.Optimizer], dict[str, torch.Tensor]]:
    """The single-process optimizers for ``config.optim`` (sgd or row-wise Adagrad on the
    tables; sgd or Adagrad on the dense part), written from the config's values rather than
    through train/optimizers.py. Returns (optimizers, table name -> its row-wise state, [rows,
    k], for the tables that have one)."""
    from torchrec.optim import RowWiseAdagrad

    from train.build import embedding_parameters
    from train.tables import table_name_of

    optim = config.optim
    tables = {
        table_name_of(name): param
        for group in model.model.embedding_groups.values()
        for collection in group.collections()
        for name, param in collection.named_parameters()
    }
    embedding_ids = {id(p) for p in embedding_parameters(model)}
    assert embedding_ids == {id(p) for p in tables.values()}
    dense_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    if optim.dense == "sgd":
        dense = torch.optim.SGD(dense_params, lr=optim.dense_lr)
    elif optim.dense == "adagrad":
        dense = torch.optim.Adagrad(dense_params, lr=optim.dense_lr, eps=optim.eps)
    else:
        raise NotImplementedError(f"no reference for dense optimizer {optim.dense}")
    states: dict[str, torch.Tensor] = {}
    if optim.embedding == "sgd":
        embedding = [torch.optim.SGD(list(tables.values()), lr=optim.embedding_lr)]
    elif optim.embedding == "rowwise_adagrad":
        whole = [p for name, p in tables.items() if name not in blocks]
        split = [name for name in tables if name in blocks]
        embedding = []
        if whole:
            embedding.append(RowWiseAdagrad(whole, lr=optim.embedding_lr, eps=optim.eps))
        if split:
            embedding.append(
                ColumnBlockRowWiseAdagrad(
                    [tables[n] for n in split], [blocks[n] for n in split],
                    lr=optim.embedding_lr, eps=optim.eps,
                )
            )
        for optimizer in embedding:
            for name, param in tables.items():
                if param in optimizer.state:
                    states[name] = optimizer.state[param]["sum"]
    else:
        raise NotImplementedError(f"no reference for embedding optimizer {optim.embedding}")
    return [dense, *embedding], states


def train_unsharded(
    config: Config,
    groups: list,
    world_size: int,
    steps: int,
    blocks: dict[str, list[tuple[int, int]]] | None = None,
    managed_init_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """The single-process reference: the unsharded model fed the global batch (every rank's
    batch of a step, concatenated), trained with ``reference_optimizers`` at the config's
    learning rates.

    ``blocks``: tables whose row-wise Adagrad state is kept per column block (as the sharded
    run's column-wise shards keep it; see ``column_blocks``). Managed tables run as
    ``world_size`` independent maps split by ID range (tests/managed_reference.py), their
    admitted rows reset with ``managed_init_fn``.

    Returns {"losses": global mean per step, "rank_losses": [ranks, steps] (each rank's slice
    of the global batch), "logits": [ranks, steps, B], "tables" and "initial_tables" (after
    and before training), "states" (row-wise Adagrad state per table, when the optimizer has
    one), "model"}."""
    from tests.managed_reference import use_range_split_maps
    from train.build import build_click_model, init_tables
    from train.data import planted_data
    from train.tables import local_table_blocks

    model = build_click_model(config, groups, torch.device("cpu"), world_size)
    init_tables(model, groups, config.trainer.seed)
    optimizers, states = reference_optimizers(config, model, blocks or {})

    def reset_state(table: str, rows: torch.Tensor) -> None:
        if table in states:
            states[table][rows] = 0

    use_range_split_maps(model, world_size, managed_init_fn, reset_state)
    initial_tables = {b.table_name: b.tensor.detach().clone() for b in local_table_blocks(model)}
    data = planted_data(config, groups)
    losses, rank_losses, logits = [], [], []
    for step in range(steps):
        batch = concat_batches([data.batch("train", rank, step)[0] for rank in range(world_size)])
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss, (_, step_logits, labels) = model(batch)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(float(loss.detach()))
        per_sample = torch.nn.functional.binary_cross_entropy_with_logits(
            step_logits, labels, reduction="none"
        )
        rank_losses.append(per_sample.view(world_size, -1).mean(dim=1).double())
        logits.append(step_logits.view(world_size, -1))
    tables = {b.table_name: b.tensor.detach().clone() for b in local_table_blocks(model)}
    return {
        "losses": losses,
        "rank_losses": torch.stack(rank_losses, dim=1),
        "logits": torch.stack(logits, dim=1),
        "tables": tables,
        "initial_tables": initial_tables,
        "states": {name: state.clone() for name, state in states.items()},
        "model": model,
    }


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
