"""Managed collisions: TorchRec's MCH modules in front of a feature group's managed tables.

Method ``managed`` gives each of a feature's IDs a row of its own while rows last: a
``MCHManagedCollisionModule`` per table keeps a sorted map raw ID -> row, and every
``eviction_interval`` training steps admits the IDs seen since the last admission, evicting
the map's lowest-scoring IDs (LFU, LRU, or DistanceLFU: counts decayed by the steps since the
last access). IDs not in the map share the table's last row. Evaluation never admits.

hashrec's id mapper hashes every raw ID into [0, MANAGED_INPUT_SPACE) first (splitmix64, a
bijection on 64 bits, masked to 63: a collision there needs ~2^31 IDs to become likely). The
hash spreads IDs evenly because TorchRec shards the map row-wise by *ID value range*: rank r
owns the hashed IDs of the r-th slice of [0, MANAGED_INPUT_SPACE) and the r-th block of rows,
and admits and evicts only among those. So a managed table sharded over N ranks is N
independent maps of rows / N rows each, and which row an ID gets depends on N (unlike every
other method, whose mapping is a pure function of the ID).

TorchRec's sharder for these modules offers row-wise sharding only.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)

from modules.features import EVICTION_POLICIES

# Hashed IDs lie in [0, 2^63 - 1): the MCH module marks empty slots with int64 max, which a
# hashed ID must never equal.
MANAGED_INPUT_SPACE = (1 << 63) - 1
# Per row of a managed table, besides the embedding: the sorted raw ID, its row, and two
# int64 eviction metadata (counts and last access for distance_lfu).
MANAGED_STATE_BYTES_PER_ROW = 4 * 8


def eviction_policy(name: str) -> MCHEvictionPolicy:
    if name == "distance_lfu":
        return DistanceLFU_EvictionPolicy()
    if name == "lfu":
        return LFU_EvictionPolicy()
    if name == "lru":
        return LRU_EvictionPolicy()
    raise ValueError(f"eviction policy {name!r} is not one of {', '.join(EVICTION_POLICIES)}")


def managed_collection(
    tables: list[EmbeddingBagConfig],
    policies: dict[str, tuple[str, int]],
    num_shards: int,
    device: torch.device,
) -> ManagedCollisionEmbeddingBagCollection:
    """An EmbeddingBagCollection of ``tables`` behind one MCH module per table.

    Args:
        tables: sum-pooled table configs (built on ``meta`` when DMP will shard them).
        policies: table name -> (eviction policy name, eviction interval in training steps).
        num_shards: the world size it will be sharded over; TorchRec's planner wants the
            modules' bucket count to be a multiple of it.
    """
    modules = {
        table.name: MCHManagedCollisionModule(
            zch_size=table.num_embeddings,
            device=device,
            eviction_policy=eviction_policy(policies[table.name][0]),
            eviction_interval=policies[table.name][1],
            input_hash_size=MANAGED_INPUT_SPACE,
            buckets=num_shards,
            name=table.name,
        )
        for table in tables
    }
    return ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=tables, device=device),
        ManagedCollisionCollection(modules, tables),
        return_remapped_features=False,
    )


def mch_modules(model: torch.nn.Module) -> dict[str, MCHManagedCollisionModule]:
    """Table name -> this rank's MCH module (its shard of the map, when sharded)."""
    return {
        name.rsplit(".", 1)[-1]: module
        for name, module in model.named_modules()
        if isinstance(module, MCHManagedCollisionModule)
    }


@torch.no_grad()
def admitted(module: MCHManagedCollisionModule, hashed_ids: torch.Tensor) -> torch.Tensor:
    """bool [N] (on ``hashed_ids``' device): which of ``hashed_ids`` hold a row of their own
    in this (shard of the) map."""
    sorted_ids = module._mch_sorted_raw_ids
    ids = hashed_ids.to(sorted_ids.device)
    position = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
    return (sorted_ids[position] == ids).to(hashed_ids.device)
