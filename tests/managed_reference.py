"""A single process that does what N ranks do with managed (MCH) tables, for reference runs.

TorchRec shards a managed table row-wise by hashed-ID range: rank r admits and evicts only
the IDs in the r-th slice of [0, MANAGED_INPUT_SPACE), into the r-th block of rows, whose last
row the IDs without a row share (modules/managed_collisions.py). An N-rank run is therefore
one process holding N independent maps, each fed its slice of the global batch's IDs, which
is what ``RangeSplitManagedCollection`` is: the maps are built as TorchRec's sharder builds
its shards (``rebuild_with_output_id_range``), the IDs are routed by the documented ranges
(not by asking the sharded code), and the rows an admission takes over are reset before the
lookup, as the sharded collection does. TorchRec's unsharded collection cannot serve as the
reference: it keeps one map, and its ``evict`` is a stub that never resets a row.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from modules.managed_collisions import MANAGED_INPUT_SPACE


class RangeSplitManagedCollection(nn.Module):
    """A managed collection's tables behind ``num_shards`` maps each, split by hashed-ID range.

    forward(features: KJT of hashed IDs) -> (KeyedTensor [B, sum of dims], None), the form of
    TorchRec's ManagedCollisionEmbeddingBagCollection.

    Args:
        collection: the unsharded managed collection (its tables and untrained maps).
        num_shards: the world size the sharded run used.
        init_fn: fresh values for rows an admission takes over (None: the table's init_fn).
        reset_state: called with (table, global rows) on every reset, to zero the reference
            optimizer's state of those rows as fbgemm's reset does.
    """

    def __init__(
        self,
        collection: ManagedCollisionEmbeddingBagCollection,
        num_shards: int,
        init_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        reset_state: Callable[[str, torch.Tensor], None],
    ) -> None:
        super().__init__()
        maps = collection._managed_collision_collection
        self.embedding_bags = collection._embedding_module
        self.feature_to_table = dict(maps._feature_to_table)
        assert len(set(self.feature_to_table.values())) == len(self.feature_to_table), (
            "one feature per managed table (TorchRec's MC sharder allows no shared tables)"
        )
        self.maps = nn.ModuleDict()
        for table, module in maps._managed_collision_modules.items():
            rows = module.output_size()
            assert rows % num_shards == 0, f"{table}: {rows} rows over {num_shards} ranks"
            per_shard = rows // num_shards
            segments = [shard * per_shard for shard in range(num_shards)] + [rows]
            self.maps[table] = nn.ModuleList(
                module.rebuild_with_output_id_range(
                    (shard * per_shard, (shard + 1) * per_shard), segments, torch.device("cpu")
                )
                for shard in range(num_shards)
            )
        configs = {c.name: c for c in self.embedding_bags.embedding_bag_configs()}
        self.init_fns = {table: init_fn or configs[table].init_fn for table in self.maps}
        self.reset_state = reset_state
        # Hashed IDs in [k * block, (k + 1) * block) belong to shard k: TorchRec's row-wise
        # input dist buckets by ceil(input size / buckets), with buckets = num_shards here.
        self.block = -(-MANAGED_INPUT_SPACE // num_shards)

    def forward(self, features: KeyedJaggedTensor) -> tuple[KeyedTensor, None]:
        remapped = features.values().clone()
        for key, start, stop in zip(
            features.keys(), features.offset_per_key()[:-1], features.offset_per_key()[1:]
        ):
            ids = features.values()[start:stop]
            table = self.feature_to_table[key]
            shard_of = torch.div(ids, self.block, rounding_mode="floor")
            for shard, module in enumerate(self.maps[table]):
                mask = shard_of == shard
                picked = ids[mask]
                # Every shard profiles every step, empty or not, as every rank does.
                rows = module(
                    {table: JaggedTensor(values=picked, lengths=torch.tensor([picked.numel()]))}
                )[table].values()
                remapped[start:stop][mask] = rows
        self._reset_admitted_rows()
        lookup = KeyedJaggedTensor(
            keys=features.keys(), values=remapped, lengths=features.lengths()
        )
        return self.embedding_bags(lookup), None

    @torch.no_grad()
    def _reset_admitted_rows(self) -> None:
        for table, shards in self.maps.items():
            weight = self.embedding_bags.embedding_bags[table].weight
            for module in shards:
                rows = module.evict()
                if rows is None:
                    continue
                rows = rows.long()
                weight[rows] = self.init_fns[table](weight[rows].clone())
                self.reset_state(table, rows)


def use_range_split_maps(
    model: nn.Module,
    num_shards: int,
    init_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    reset_state: Callable[[str, torch.Tensor], None],
) -> None:
    """Swap every feature group's managed collection of a ClickModelTrain for a
    RangeSplitManagedCollection over the same tables (a no-op without managed tables)."""
    for group in model.model.embedding_groups.values():
        if group.managed_collection is not None:
            group.managed_collection = RangeSplitManagedCollection(
                group.managed_collection, num_shards, init_fn, reset_state
            )


def shard_maps(collection: RangeSplitManagedCollection) -> dict[str, list]:
    """Table -> per shard (hashed IDs, their global rows), the entries in use."""
    empty = torch.iinfo(torch.int64).max
    return {
        table: [
            (m._mch_sorted_raw_ids[m._mch_sorted_raw_ids != empty].clone(),
             m._mch_remapped_ids_mapping[m._mch_sorted_raw_ids != empty].clone())
            for m in shards
        ]
        for table, shards in collection.maps.items()
    }
