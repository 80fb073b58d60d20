"""Reach the local pieces of (possibly sharded) embedding tables, whatever the sharding.

A sharded table appears in the model's state_dict as a ShardedTensor whose local shards
carry their row and column offsets in the full table; a data-parallel table appears as a
plain tensor replicated on every rank. Both are views of the live weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


@dataclass
class TableBlock:
    """A rows x cols block of a table held by this rank."""

    table_name: str
    tensor: torch.Tensor
    row_offset: int
    column_offset: int
    replicated: bool  # True for data-parallel tables (every rank holds the same block)


def table_name_of(state_key: str) -> str | None:
    """``...embedding_bags.<table>.weight`` -> ``<table>``; None for non-table keys."""
    parts = state_key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags":
        return parts[-2]
    return None


def local_table_blocks(model: nn.Module) -> Iterator[TableBlock]:
    """Every block of every embedding table that lives on this rank."""
    for key, value in model.state_dict().items():
        table_name = table_name_of(key)
        if table_name is None:
            continue
        yield from tensor_blocks(table_name, value)


def tensor_blocks(name: str, value: torch.Tensor) -> Iterator[TableBlock]:
    """The local blocks of a ShardedTensor, or a plain tensor as one replicated block."""
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            offsets = list(shard.metadata.shard_offsets) + [0]
            yield TableBlock(name, shard.tensor, offsets[0], offsets[1], replicated=False)
    else:
        yield TableBlock(name, value, 0, 0, replicated=True)
