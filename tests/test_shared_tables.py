"""Hashing method shared: one table per feature group, read by each of its shared features.

The mapping (salted per feature, rows anywhere in the table, keys in the collection's order),
the config (``hashing=shared``: the same rows as ``hash`` at any compression ratio), the
report (bytes counted once, the table's collisions against balls into bins) and sharding (2
gloo ranks, row-wise, table-wise and column-wise, equal one process fed the global batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from modules.collisions import expected_occupied_bins, occupied_bins_std
from modules.embeddings import embedding_collection
from modules.features import FeatureGroupSpec, FeatureSpec, HashingSpec
from modules.hashing import check_unique_names, group_tables
from modules.id_mapping import HashingIdMapper
from tests.helpers import (
    TINY,
    column_blocks,
    compose_config,
    full_tables,
    gather_outputs,
    run_ranks,
    train_sharded,
    train_unsharded,
)
from tests.test_sharding_equivalence import SGD_ATOL, WIDE, assert_matches
from train.build import feature_groups
from train.data import planted_data
from train.hashing import hashing_report
from train.planning import plan_for_topology
from train.sharding import table_infos

# Balls-into-bins counts may stray this many standard deviations by chance (two-sided
# probability about 6e-5 under a normal approximation).
STD_MARGIN = 4.0


def feature(name: str, method: str, rows: int) -> FeatureSpec:
    return FeatureSpec(name, 10**12, rows, hashing=HashingSpec(method))


def mapped_rows(mapper: HashingIdMapper, name: str, ids: torch.Tensor) -> torch.Tensor:
    return mapper.feature_rows(name, ids)[:, 0]


def test_shared_features_hash_into_one_table_with_salts_of_their_own():
    # Shared features a and c are not neighbours: the table sits where a is, and the mapper
    # emits its keys in the collection's order.
    features = (feature("a", "shared", 30), feature("b", "hash", 50), feature("c", "shared", 70))
    group = FeatureGroupSpec("g", 8, features)
    assert [(t.name, t.num_embeddings, t.feature_names) for t in group_tables(group)] == [
        ("g_shared", 100, ("a", "c")),
        ("b", 50, ("b",)),
    ]
    mapper = HashingIdMapper(list(features))
    ebc = embedding_collection(group, torch.device("cpu"))
    assert mapper.output_keys == [k for t in ebc.embedding_bag_configs() for k in t.feature_names]

    num_ids, num_rows = 5000, 100
    ids = torch.randint(-(1 << 62), 1 << 62, (num_ids,))
    rows_a, rows_c = mapped_rows(mapper, "a", ids), mapped_rows(mapper, "c", ids)
    # Both reach every row of the whole table, not a slice of their own size: P(one row
    # missed by 5000 uniform IDs) = 100 (1 - 1/100)^5000 < 1e-19.
    for rows in (rows_a, rows_c):
        assert rows.min() == 0 and rows.max() == num_rows - 1
        assert torch.unique(rows).numel() == num_rows
    # The same ID of two features: independent rows, equal by chance only (1 in 100). The
    # count of equal rows is binomial(5000, 1/100): mean 50, std 7.0.
    same = int((rows_a == rows_c).sum())
    mean = num_ids / num_rows
    std = math.sqrt(num_ids * (1 / num_rows) * (1 - 1 / num_rows))
    assert abs(same - mean) < STD_MARGIN * std, f"{same} of {num_ids} IDs on the same row"
    # The other method of the group keeps its own table and rows.
    assert mapped_rows(mapper, "b", ids).max() < 50


def test_hashing_shared_config_keeps_the_rows_of_hash_at_any_compression_ratio():
    for ratio in ([], ["hashing.compression_ratio=1000"]):
        shared = compose_config([*TINY, "hashing=shared", *ratio])
        hashed = compose_config([*TINY, "hashing=default", *ratio])
        shared_groups = feature_groups(shared.features, shared.hashing)
        hashed_groups = feature_groups(hashed.features, hashed.hashing)
        tables = {t.name: t for t in table_infos(shared_groups)}
        for group, hashed_group in zip(shared_groups, hashed_groups):
            methods = {f.name: f.hashing.method for f in group.features}
            pinned = {f.name for f in hashed_group.features if f.hashing.method == "none"}
            # Every feature not pinned to none is shared, into its own group's table.
            assert {n for n, m in methods.items() if m != "shared"} == pinned
            table = tables[f"{group.name}_shared"]
            hashed_rows = {f.name: f.num_embeddings for f in hashed_group.features}
            assert table.num_embeddings == sum(hashed_rows[n] for n in methods if n not in pinned)
        # The budget: the same rows and bytes in all as one hash table per feature.
        hashed_tables = table_infos(hashed_groups)
        assert sum(t.num_embeddings * t.embedding_dim for t in tables.values()) == sum(
            t.num_embeddings * t.embedding_dim for t in hashed_tables
        )
    # Per feature, too: only ad_id shares (a table of its own rows, named after the group).
    config = compose_config([*TINY, "+hashing.features.ad_id.method=shared"])
    ad = feature_groups(config.features, config.hashing)[1]
    assert [t.name for t in group_tables(ad)] == ["ad_shared", "advertiser_id", "ad_category"]


def test_a_feature_named_like_its_groups_shared_table_is_one_line():
    config = compose_config([*TINY, "hashing=shared"])
    groups = feature_groups(config.features, config.hashing)
    user = groups[0]
    renamed = FeatureSpec("user_shared", 10**6, 10, hashing=HashingSpec("hash"))
    clash = FeatureGroupSpec(user.name, user.embedding_dim, (*user.features, renamed))
    with pytest.raises(ValueError, match=r"^table user_shared \(of feature user_shared\) clashes "
                       r"with a table of group user, shared by features user_id, user_interests"):
        check_unique_names([clash, *groups[1:]])


# Tables whose rows are about as many as the eval window's distinct IDs, so that collisions
# are frequent and a wrong count would show.
REPORT = [
    *TINY, "hashing=shared", "trainer.batch_size=256", "plan_topology.world_size=2",
    "plan_only=true", "sharding=row_wise",
    "features.groups.user.features.user_id.num_embeddings=600",
    "features.groups.user.features.user_interests.num_embeddings=400",
    "features.groups.ad.features.ad_id.num_embeddings=300",
    "features.groups.ad.features.advertiser_id.num_embeddings=200",
]


def test_report_counts_each_byte_once_and_the_tables_collisions_as_balls_into_bins():
    config = compose_config(REPORT)
    groups = feature_groups(config.features, config.hashing)
    data = planted_data(config, groups)
    eval_batches = [data.batch("eval", 0, step)[0] for step in range(4)]
    report = hashing_report(groups, config.optim.embedding, eval_batches)

    # Bytes: the features' shares sum to what the plan places (weights and row-wise Adagrad
    # state on both ranks), table by table and for the whole job.
    plan = plan_for_topology(config, groups)
    placed = {t.name: sum(t.bytes_per_rank.values()) for t in plan.placed}
    assert sum(entry["bytes_hashed"] for entry in report.values()) == sum(placed.values())
    for group in groups:
        table = f"{group.name}_shared"
        sharing = [f for f in group.features if f.hashing.method == "shared"]
        shares = [report[f.name]["tables"] for f in sharing]
        assert all(list(share) == [table] for share in shares)
        assert sum(share[table] for share in shares) == next(
            t.num_embeddings for t in group_tables(group) if t.name == table
        )
        assert sum(report[f.name]["bytes_hashed"] for f in sharing) == placed[table]

    # Collisions: the (feature, ID) pairs of both features in their table's rows.
    tables = {"user": ("user_id", "user_interests"), "ad": ("ad_id", "advertiser_id")}
    for group, names in tables.items():
        entries = [report[name] for name in names]
        pairs = sum(
            torch.cat([b.sparse_features[group][name].values() for b in eval_batches])
            .unique()
            .numel()
            for name in names
        )
        rows = sum(report[name]["rows"] for name in names)
        assert all(e["eval_distinct_ids"] == pairs for e in entries)
        assert all(e["shared_by"] == list(names) for e in entries)
        expected, std = expected_occupied_bins(pairs, rows), occupied_bins_std(pairs, rows)
        # A real test: the window's pairs crowd the table (more pairs than rows).
        assert pairs > rows and std > 0
        measured = entries[0]["eval_distinct_rows"]
        assert abs(measured - expected) < STD_MARGIN * std, (
            f"{group}: {measured} rows for {pairs} pairs in {rows}, expected {expected:.1f} "
            f"+- {std:.1f}"
        )
        assert entries[0]["expected_collision_rate_at_eval_ids"] == pytest.approx(
            1 - expected / pairs, rel=1e-12
        )


# 2 gloo ranks against one process. SGD, whose single-process reference is exact for every
# sharding type (tests/test_sharding_equivalence.py); column-wise runs use the dim at which
# TorchRec really splits the columns into two shards.
SHARDINGS = ["row_wise", "table_wise", "column_wise"]
STEPS = 4
BASE = [*TINY, "hashing=shared", "optim=sgd"]


def sharded_overrides(sharding: str) -> list[str]:
    return [*BASE, f"sharding={sharding}", *(WIDE if sharding == "column_wise" else [])]


def table_sizes(groups) -> dict[str, tuple[int, int]]:
    return {t.name: (t.num_embeddings, t.embedding_dim) for g in groups for t in group_tables(g)}


def sharded_worker(rank: int, world_size: int, out_path: str) -> None:
    results = {}
    for sharding in SHARDINGS:
        config = compose_config(sharded_overrides(sharding))
        groups = feature_groups(config.features, config.hashing)
        job, _, outputs = train_sharded(config, groups, rank, world_size, STEPS)
        results[sharding] = {
            "outputs": gather_outputs(outputs),
            "tables": full_tables(job.model, table_sizes(groups), rank),
            "types": {t.name: t.sharding_type for t in job.placed},
            "ranks": {t.name: t.ranks for t in job.placed},
            "blocks": column_blocks(job.model),
        }
    if rank == 0:
        torch.save(results, out_path)


def test_shared_tables_sharded_equal_one_process(tmp_path):
    out_path = tmp_path / "sharded.pt"
    run_ranks(sharded_worker, 2, str(out_path))
    sharded = torch.load(out_path, weights_only=False)
    references = {}
    for sharding in SHARDINGS:
        wide = sharding == "column_wise"
        if wide not in references:
            config = compose_config(sharded_overrides(sharding))
            groups = feature_groups(config.features, config.hashing)
            references[wide] = train_unsharded(config, groups, 2, STEPS)
        expected, result = references[wide], sharded[sharding]
        # The shared tables really are placed that way (row-wise: over both ranks).
        assert result["types"]["user_shared"] == result["types"]["ad_shared"] == sharding
        if sharding == "row_wise":
            assert result["ranks"]["user_shared"] == [0, 1]
        if sharding == "column_wise":
            assert len(result["blocks"]["user_shared"]) == len(result["blocks"]["ad_shared"]) == 2
        assert_matches(result, expected, SGD_ATOL, f"shared {sharding}")
        for name in ("user_shared", "ad_shared"):
            moved = float((expected["tables"][name] - expected["initial_tables"][name]).abs().max())
            assert moved > 1000 * SGD_ATOL, f"{sharding}: table {name} moved only {moved:.2e}"
