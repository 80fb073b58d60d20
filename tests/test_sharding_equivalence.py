"""Sharded equals unsharded: 2 gloo ranks vs one process fed the global batch."""

from __future__ import annotations

import torch

from tests.helpers import TINY, compose_config, full_tables, run_ranks, train_sharded, train_unsharded
from train.build import feature_groups
from train.config import SHARDING_TYPES

SHARDINGS = [*SHARDING_TYPES, "mixed", "auto"]
STEPS = 4
OVERRIDES = [*TINY, "optim=sgd", "sharding.mixed_row_threshold=40"]


def sharded_worker(rank: int, world_size: int, out_path: str) -> None:
    results = {}
    for sharding in SHARDINGS:
        config = compose_config([*OVERRIDES, f"sharding={sharding}"])
        groups = feature_groups(config.features)
        job, _, losses = train_sharded(config, groups, rank, world_size, STEPS)
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
    return train_unsharded(config, feature_groups(config.features), world_size, STEPS)


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
