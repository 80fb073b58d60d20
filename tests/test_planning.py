"""plan_only for a cluster we do not have: TorchRec's planner over a target topology."""

from __future__ import annotations

import pytest

from tests.helpers import compose_config, run_train
from train.build import feature_groups
from train.planning import plan_for_topology

MLPERF = ["features=criteo_mlperf", "model=dcn", "plan_only=true", "trainer.batch_size=16384",
          "logger.mode=disabled"]


def test_mlperf_tables_fit_on_8_gpus_and_total_matches_published_size():
    config = compose_config([*MLPERF, "plan_topology.world_size=8"])
    plan = plan_for_topology(config, feature_groups(config.features))
    assert len(plan.placed) == 26
    weights = sum(t.num_embeddings * t.embedding_dim * 4 for t in plan.placed)
    assert weights == 204_184_588 * 128 * 4  # 104.5 GB, as published for MLPerf DLRM
    planned = sum(sum(t.bytes_per_rank.values()) for t in plan.placed)
    assert planned == weights + 204_184_588 * 4  # plus one row-wise Adagrad value per row
    assert max(plan.hbm_bytes_per_rank) <= plan.caps.device_bytes
    assert {rank for t in plan.placed for rank in t.ranks} <= set(range(8))


def test_row_wise_plan_spreads_every_table_over_64_ranks():
    config = compose_config([*MLPERF, "plan_topology.world_size=64", "sharding=row_wise"])
    plan = plan_for_topology(config, feature_groups(config.features))
    big = [t for t in plan.placed if t.num_embeddings == 40_000_000]
    assert big and all(len(t.ranks) == 64 for t in big)


def test_plan_that_does_not_fit_exits_nonzero_naming_largest_tables(tmp_path):
    result = run_train(
        [*MLPERF, "plan_topology.world_size=1", "plan_topology.host_memory_bytes=1000000000"],
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2
    assert "plan does not fit" in result.stderr
    assert "Largest tables: C1 (40,000,000 rows x 128" in result.stderr
    assert "plan_topology.world_size" in result.stderr


def test_target_topology_requires_plan_only():
    with pytest.raises(ValueError, match="set plan_only=true"):
        compose_config(["plan_topology.world_size=8"])
