"""Sharded equals unsharded: 2 gloo ranks vs one process fed the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from modules.synthetic import PlantedClickData
from tests.helpers import TINY, compose_config, concat_batches, run_ranks
from train.build import build_click_model, build_sharded_job, feature_groups, init_tables
from train.distributed import DistributedContext
from train.data import planted_data
from train.tables import local_table_blocks

SHARDINGS = [
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
    "mixed",
    "auto",
]
STEPS = 4
OVERRIDES = [*TINY, "optim=sgd", "sharding.mixed_row_threshold=40"]


def full_tables(model: torch.nn.Module, sizes: dict[str, tuple[int, int]], rank: int) -> dict:
    """Every table assembled from all ranks' blocks (a collective)."""
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


def sharded_worker(rank: int, world_size: int, out_path: str) -> None:
    results = {}
    for sharding in SHARDINGS:
        config = compose_config([*OVERRIDES, f"sharding={sharding}"])
        groups = feature_groups(config.features)
        context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
        job = build_sharded_job(config, groups, context)
        data = planted_data(config, groups)
        pipeline = TrainPipelineSparseDist(
            job.model, job.optimizer, torch.device("cpu"), pipeline_postproc=True
        )
        batches = iter([data.batch("train", rank, step)[0] for step in range(STEPS)])
        losses = []
        for _ in range(STEPS):
            loss, _, _ = pipeline.progress(batches)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(float(global_loss) / world_size)
        sizes = {f.name: (f.num_embeddings, g.embedding_dim) for g in groups for f in g.features}
        results[sharding] = {
            "losses": losses,
            "tables": full_tables(job.model, sizes, rank),
            "types": sorted({t.sharding_type for t in job.placed}),
        }
    if rank == 0:
        torch.save(results, out_path)


def unsharded_reference(world_size: int) -> dict:
    config = compose_config([*OVERRIDES, "sharding=table_wise"])
    groups = feature_groups(config.features)
    model = build_click_model(config, groups, torch.device("cpu"))
    init_tables(model, groups, config.trainer.seed)
    embedding_params = [
        p for g in model.model.embedding_groups.values() for p in g.embedding_collection.parameters()
    ]
    embedding_ids = {id(p) for p in embedding_params}
    dense_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    optimizer = torch.optim.SGD(
        [
            {"params": embedding_params, "lr": config.optim.embedding_lr},
            {"params": dense_params, "lr": config.optim.dense_lr},
        ]
    )
    data: PlantedClickData = planted_data(config, groups)
    losses = []
    for step in range(STEPS):
        batch = concat_batches([data.batch("train", rank, step)[0] for rank in range(world_size)])
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tables = {
        block.table_name: block.tensor.detach().clone() for block in local_table_blocks(model)
    }
    return {"losses": losses, "tables": tables}


def test_every_sharding_matches_single_process(tmp_path):
    out_path = tmp_path / "sharded.pt"
    run_ranks(sharded_worker, 2, str(out_path))
    sharded = torch.load(out_path, weights_only=False)
    reference = unsharded_reference(2)
    assert reference["losses"][-1] < reference["losses"][0] + 0.1
    for sharding in SHARDINGS:
        result = sharded[sharding]
        torch.testing.assert_close(
            torch.tensor(result["losses"]),
            torch.tensor(reference["losses"]),
            atol=1e-5,
            rtol=1e-5,
            msg=f"{sharding}: losses differ",
        )
        for name, table in reference["tables"].items():
            torch.testing.assert_close(
                result["tables"][name], table, atol=1e-5, rtol=1e-5,
                msg=lambda m, s=sharding, n=name: f"{s}: table {n} differs: {m}",
            )
    # The presets really placed what they say.
    assert sharded["row_wise"]["types"] == ["row_wise"]
    assert sharded["data_parallel"]["types"] == ["data_parallel"]
    assert sharded["mixed"]["types"] == ["row_wise", "table_wise"]
