"""Sharding managed-collision collections, with the eviction step that CPU lacks.

When an MCH module admits new IDs into rows that held others, TorchRec's sharded collection
resets those rows: fbgemm's ``reset_weight_momentum`` zeroes the rows and their row-wise
Adagrad state, then the table's ``init_fn`` draws fresh weights. That fbgemm op has a CUDA
kernel only: on CPU the first admission under row-wise Adagrad fails with "Could not run
'fbgemm::reset_weight_momentum' with arguments from the 'CPU' backend". On CPU this sharder's
collection resets the rows itself through fbgemm's public per-table views (weights and every
optimizer state); on GPU it is TorchRec's collection unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection


class ShardedManagedCollection(ShardedManagedCollisionEmbeddingBagCollection):
    """TorchRec's sharded managed collection; on CPU it resets evicted rows without fbgemm's
    CUDA-only op."""

    def _evict(self, evictions_per_table: dict[str, Optional[torch.Tensor]]) -> None:
        if self._device.type != "cpu":
            super()._evict(evictions_per_table)
            return
        for table, rows in evictions_per_table.items():
            if rows is None:
                continue
            reset_rows(self, table, rows.long())


@torch.no_grad()
def reset_rows(
    module: ShardedManagedCollisionEmbeddingBagCollection, table: str, rows: torch.Tensor
) -> None:
    """Give this rank's ``rows`` of ``table`` (shard-local indices) fresh weights from the
    table's init_fn and zero optimizer state, as TorchRec does on GPU."""
    tbe, logical_table_ids = module._table_to_tbe_and_index[table]
    index = int(logical_table_ids[0])
    for state in tbe.split_optimizer_states()[index]:
        state[rows] = 0
    weight = tbe.split_embedding_weights()[index]
    init_fn = module._embedding_module._table_name_to_config[table].init_fn
    weight[rows] = init_fn(weight[rows].clone())


class ManagedCollectionSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's sharder for managed collections (row-wise only), building the collection
    above."""

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedManagedCollection:
        return ShardedManagedCollection(
            module,
            params,
            ebc_sharder=self._e_sharder,
            mc_sharder=self._mc_sharder,
            env=env,
            device=device or torch.device("cuda"),
        )
