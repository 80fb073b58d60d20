"""Embedding tables: TorchRec configs per feature group, and sharding-independent init."""

from __future__ import annotations

import math

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from modules.features import FeatureGroupSpec
from modules.hash_functions import hash64, seed_salt, uniform_from_hash
from modules.hashing import tables_with_features
from modules.managed_collisions import managed_collection

# Values initialised per chunk: small enough that the ~15 elementwise passes of the hash stay
# in cache (13x faster than 16M-value chunks on the dev machine) and memory stays bounded.
_INIT_CHUNK_VALUES = 1 << 18


def managed_feature_names(group: FeatureGroupSpec) -> list[str]:
    """The group's features with hashing ``managed`` (their tables sit behind MCH modules)."""
    return [f.name for f in group.features if f.hashing.method == "managed"]


def table_configs(group: FeatureGroupSpec, managed: bool | None = None) -> list[EmbeddingBagConfig]:
    """Sum-pooled TorchRec tables (``group_tables``); a table read by several keys (multi-hash
    probes, the features of a shared table) is one table with several feature names,
    TorchRec's way of sharing a table, which pools each key on its own.

    ``managed``: True = only the managed features' tables, False = only the others, None = all.
    """
    return [
        EmbeddingBagConfig(
            name=table.name,
            embedding_dim=table.embedding_dim,
            num_embeddings=table.num_embeddings,
            feature_names=list(table.feature_names),
            pooling=PoolingType.SUM,
        )
        for table, features in tables_with_features(group)
        if managed is None or (features[0].hashing.method == "managed") == managed
    ]


def embedding_collection(group: FeatureGroupSpec, device: torch.device) -> EmbeddingBagCollection:
    """The group's EmbeddingBagCollection of every table; build it on ``meta`` when DMP will
    shard it."""
    return EmbeddingBagCollection(tables=table_configs(group), device=device)


def group_collections(
    group: FeatureGroupSpec, device: torch.device, num_shards: int
) -> tuple[EmbeddingBagCollection | None, ManagedCollisionEmbeddingBagCollection | None]:
    """(plain tables, managed tables) of a group, either None when the group has no such
    tables. ``num_shards``: the world size the managed tables will be sharded over."""
    plain = table_configs(group, managed=False)
    managed = table_configs(group, managed=True)
    policies = {
        f.name: (f.hashing.eviction_policy, f.hashing.eviction_interval)
        for f in group.features
        if f.hashing.method == "managed"
    }
    return (
        EmbeddingBagCollection(tables=plain, device=device) if plain else None,
        managed_collection(managed, policies, num_shards, device) if managed else None,
    )


def init_bound(num_embeddings: int) -> float:
    """TorchRec's default init range for a table: U(-sqrt(1/rows), sqrt(1/rows))."""
    return math.sqrt(1.0 / num_embeddings)


@torch.no_grad()
def fill_table_block(
    block: torch.Tensor,
    *,
    seed: int,
    table_name: str,
    num_embeddings: int,
    embedding_dim: int,
    row_offset: int,
    column_offset: int,
) -> None:
    """Fill ``block`` (rows x cols of a table, at the given offsets) with the table's initial
    values, which depend only on (seed, table, row, column).

    Any sharding of a table therefore starts from the same weights as the unsharded table,
    which makes sharded and unsharded runs (and their state digests) comparable.

    Args:
        block: float [R, C] view of the rows [row_offset, row_offset + R) and columns
            [column_offset, column_offset + C) of a [num_embeddings, embedding_dim] table.
    """
    salt = seed_salt(seed, "table-init", table_name)
    bound = init_bound(num_embeddings)
    num_rows, num_cols = block.shape
    columns = torch.arange(column_offset, column_offset + num_cols, dtype=torch.int64)
    rows_per_chunk = max(1, _INIT_CHUNK_VALUES // max(1, num_cols))
    for start in range(0, num_rows, rows_per_chunk):
        stop = min(num_rows, start + rows_per_chunk)
        rows = torch.arange(row_offset + start, row_offset + stop, dtype=torch.int64)
        flat_index = rows.unsqueeze(1) * embedding_dim + columns
        values = (uniform_from_hash(hash64(flat_index, salt)) * 2.0 - 1.0) * bound
        block[start:stop].copy_(values.to(block.dtype))
