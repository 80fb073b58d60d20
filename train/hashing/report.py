"""The per-feature hashing report: bytes, rows and collision rates, expected for the declared
ID space and measured over every rank's eval batches (a collective).

A group's shared table (method shared) is split between its features by rows: each feature's
entry has ``tables: {<group>_shared: its num_embeddings}`` and the bytes of those rows, so the
features' bytes sum to the table's exactly (its rows are the sum of theirs) and every byte of
the job is counted once. Collisions are the table's: expected for the IDs of all its features
in all its rows, measured as distinct rows over the distinct (feature, ID) pairs of all its
features, which every entry of the table repeats (with ``shared_by``, the features counted)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from modules.batch import Batch
from modules.collisions import (
    distinct_signatures,
    feature_expected_collision_rate,
    measured_collision_rate,
    shared_expected_collision_rate,
)
from modules.features import FLOAT32_BYTES, FeatureGroupSpec, FeatureSpec
from modules.hashing import feature_tables, shared_features, shared_table_name
from modules.id_mapping import FREQUENT_ID_BYTES, HashingIdMapper
from modules.managed_collisions import MANAGED_STATE_BYTES_PER_ROW, admitted, mch_modules
from train.collectives import collective_device
from train.sharding import OPTIMIZER_STATE_VALUES_PER_ROW


def hashing_report(
    groups: list[FeatureGroupSpec],
    embedding_optimizer: str,
    eval_batches: Iterable[Batch],
    max_batches: int = 64,
    model: torch.nn.Module | None = None,
) -> dict[str, dict[str, Any]]:
    """Per feature: method, tables and rows, bytes (parameters + optimizer state) hashed and
    for a full table over the declared ID space, the expected collision rate for the declared
    cardinality and the one measured on the eval window (all ranks' eval batches, at most
    ``max_batches`` per rank, so a large real eval set is not read a second time in full).

    Managed features' rows depend on the model's live MCH maps: with ``model`` given they are
    measured against them (at the time of the call), else left unmeasured.

    A collective when distributed: every rank must call it with its own eval batches.
    """
    state_values = OPTIMIZER_STATE_VALUES_PER_ROW[embedding_optimizer]
    # Distinct raw IDs per feature over this rank's eval window.
    seen: dict[str, list[torch.Tensor]] = {}
    for batch in itertools.islice(eval_batches, max_batches):
        for kjt in batch.sparse_features.values():
            for name, jagged in kjt.to_dict().items():
                seen.setdefault(name, []).append(torch.unique(jagged.values().cpu()))
    local = {name: torch.unique(torch.cat(parts)) for name, parts in seen.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        # The window is every rank's eval batches: gather the distinct IDs (small: a few
        # thousand per feature) once per report.
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        local = {
            name: torch.unique(torch.cat([part[name] for part in gathered if name in part]))
            for name in local
        }
    maps = mch_modules(model) if model is not None else {}
    report: dict[str, dict[str, Any]] = {}
    for group in groups:
        mapper = HashingIdMapper(list(group.features))
        sharing = shared_features(group.features)
        shared_window = _shared_window(sharing, mapper, local) if sharing else (0, 0)
        for feature in group.features:
            if feature.hashing.method == "shared":
                report[feature.name] = _shared_entry(
                    feature, group, sharing, state_values, *shared_window
                )
                continue
            distinct_ids = local.get(feature.name)
            if feature.hashing.method == "managed":
                distinct_ids = distinct_ids if feature.name in maps else None
            report[feature.name] = _feature_entry(
                feature, group.embedding_dim, state_values, mapper, distinct_ids,
                maps.get(feature.name),
            )
    return report


def _managed_rows(mapper: HashingIdMapper, feature: FeatureSpec, distinct_ids: torch.Tensor,
                  mch: torch.nn.Module) -> int:
    """Distinct rows that a managed feature's IDs reach now: one per ID holding a row of its
    own (in whichever rank's shard of the map), plus the shared rows of the others (one per
    shard, counted as used once there are at least as many such IDs). A collective."""
    hashed = mapper.feature_rows(feature.name, distinct_ids)[:, 0]
    owned = admitted(mch, hashed).to(torch.int64)
    num_shards = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        num_shards = dist.get_world_size()
        owned = owned.to(collective_device())
        dist.all_reduce(owned)  # each ID lives in at most one rank's shard
        owned = owned.cpu()
    num_owned = int((owned > 0).sum())
    return num_owned + min(num_shards, distinct_ids.numel() - num_owned)


def row_bytes(embedding_dim: int, state_values: Callable[[int], int]) -> int:
    """One table row: its parameters and its optimizer state (float32)."""
    return (embedding_dim + state_values(embedding_dim)) * FLOAT32_BYTES


def feature_bytes(
    feature: FeatureSpec, embedding_dim: int, state_values: Callable[[int], int]
) -> int:
    """What a feature's hashing holds: its tables (parameters + optimizer state) and the maps
    that find rows (managed: the MCH map; frequency: its frequent IDs and their rows)."""
    if feature.hashing.method == "shared":  # its rows of the group's shared table
        return feature.num_embeddings * row_bytes(embedding_dim, state_values)
    total = sum(
        t.num_embeddings * row_bytes(t.embedding_dim, state_values)
        for t in feature_tables(feature, embedding_dim)
    )
    if feature.hashing.method == "managed":  # the map: raw ID, row and eviction metadata
        total += feature.num_embeddings * MANAGED_STATE_BYTES_PER_ROW
    if feature.hashing.method == "frequency":
        frequent_ids = feature.hashing.frequent_ids
        total += frequent_ids.numel() * FREQUENT_ID_BYTES  # type: ignore[union-attr]
    return total


def _entry(
    feature: FeatureSpec,
    embedding_dim: int,
    state_values,
    tables: dict[str, int],
    bytes_hashed: int,
    expected_collision_rate: float,
) -> dict[str, Any]:
    """The fields every entry has; the eval window's are filled in by the caller."""
    bytes_full = feature.id_space * row_bytes(embedding_dim, state_values)
    return {
        "method": feature.hashing.method,
        "id_space": feature.id_space,
        "tables": tables,
        "rows": sum(tables.values()),
        "buckets": sum(tables.values()),  # = rows, under the name other tools read
        "bytes_hashed": bytes_hashed,
        "bytes_full": bytes_full,
        "bytes_saved": bytes_full - bytes_hashed,
        "expected_collision_rate": expected_collision_rate,
        "eval_distinct_ids": 0,
        "eval_distinct_rows": 0,
        "measured_collision_rate": None,
        "expected_collision_rate_at_eval_ids": None,
    }


def _shared_window(
    sharing: list[FeatureSpec], mapper: HashingIdMapper, distinct_ids: dict[str, torch.Tensor]
) -> tuple[int, int]:
    """(distinct (feature, ID) pairs, distinct rows they reach) of a shared table's features
    on the eval window. Distinct IDs of different features are distinct pairs, so their counts
    add up; a row reached from two features counts once."""
    seen = [(f, distinct_ids[f.name]) for f in sharing if f.name in distinct_ids]
    num_pairs = sum(ids.numel() for _, ids in seen)
    if num_pairs == 0:
        return 0, 0
    rows = torch.cat([mapper.feature_rows(f.name, ids)[:, 0] for f, ids in seen])
    return num_pairs, int(torch.unique(rows).numel())


def _shared_entry(
    feature: FeatureSpec,
    group: FeatureGroupSpec,
    sharing: list[FeatureSpec],
    state_values,
    num_pairs: int,
    num_rows: int,
) -> dict[str, Any]:
    """A shared feature's entry: its rows of the group's table and their bytes, and the
    table's collisions over the (feature, ID) pairs of every feature in ``sharing``."""
    entry = _entry(
        feature, group.embedding_dim, state_values,
        {shared_table_name(group.name): feature.num_embeddings},
        feature.num_embeddings * row_bytes(group.embedding_dim, state_values),
        shared_expected_collision_rate(sharing),
    )
    entry["shared_by"] = [f.name for f in sharing]
    if num_pairs > 0:
        entry["eval_distinct_ids"] = num_pairs
        entry["eval_distinct_rows"] = num_rows
        entry["measured_collision_rate"] = measured_collision_rate(num_pairs, num_rows)
        entry["expected_collision_rate_at_eval_ids"] = shared_expected_collision_rate(
            sharing, num_pairs
        )
    return entry


def _feature_entry(
    feature: FeatureSpec,
    embedding_dim: int,
    state_values,
    mapper: HashingIdMapper,
    distinct_ids: torch.Tensor | None,
    mch: torch.nn.Module | None = None,
) -> dict[str, Any]:
    tables = feature_tables(feature, embedding_dim)
    entry = _entry(
        feature, embedding_dim, state_values, {t.name: t.num_embeddings for t in tables},
        feature_bytes(feature, embedding_dim, state_values),
        feature_expected_collision_rate(feature),
    )
    if distinct_ids is not None and distinct_ids.numel() > 0:
        if feature.hashing.method == "none":
            distinct_ids = distinct_ids[(distinct_ids >= 0) & (distinct_ids < feature.num_embeddings)]
        if mch is not None:
            num_rows = _managed_rows(mapper, feature, distinct_ids, mch)
        else:
            num_rows = distinct_signatures(mapper.feature_rows(feature.name, distinct_ids))
        entry["eval_distinct_ids"] = int(distinct_ids.numel())
        entry["eval_distinct_rows"] = num_rows
        entry["measured_collision_rate"] = measured_collision_rate(distinct_ids.numel(), num_rows)
        entry["expected_collision_rate_at_eval_ids"] = feature_expected_collision_rate(
            feature, distinct_ids.numel()
        )
    return entry
