"""A fingerprint of all parameters and optimizer states that ignores how tables are sharded.

Every value contributes hash(name, global index, value bits), the bits being a float's float32
bits or an integer's int64 value (frequency maps, managed-collision maps, counters);
contributions are summed modulo 2^32 in two lanes (a commutative sum, so neither the order of
shards nor their placement matters), each rank adds what it owns (replicated tensors only on
rank 0), and one all-reduce combines the ranks. Two runs with bit-identical state give the same
digest, whatever their sharding and world size; any single changed value changes it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from modules.hash_functions import hash64, logical_shift_right, seed_salt
from train.collectives import collective_device
from train.tables import tensor_blocks

_CHUNK = 1 << 18  # values per chunk: the hash passes stay in cache
_LOW32 = (1 << 32) - 1


def _block_sums(name: str, tensor: torch.Tensor, row_offset: int, col_offset: int, full_cols: int) -> torch.Tensor:
    """[2] int64 on the block's device: the two 32-bit lane sums of its contributions. The
    hashing runs where the block lives (GPU shards are never copied to the host), chunk by
    chunk, so its memory stays bounded and its time is one pass over the state."""
    salt = seed_salt("state-digest", name)
    flat = tensor.detach().reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.detach().reshape(-1, 1)
    num_rows, num_cols = flat.shape
    device = flat.device
    sums = torch.zeros(2, dtype=torch.int64, device=device)
    rows_per_chunk = max(1, _CHUNK // max(1, num_cols))
    columns = torch.arange(col_offset, col_offset + num_cols, dtype=torch.int64, device=device)
    for start in range(0, num_rows, rows_per_chunk):
        chunk = flat[start : start + rows_per_chunk]
        rows = torch.arange(row_offset + start, row_offset + start + chunk.shape[0],
                            dtype=torch.int64, device=device)
        index = rows.unsqueeze(1) * full_cols + columns
        if chunk.is_floating_point():  # its float32 bits, as 32 unsigned bits
            bits = chunk.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _LOW32
        else:  # integers (row maps, counters) and bools: their int64 value
            bits = chunk.to(torch.int64)
        mixed = hash64(hash64(index, salt) ^ bits)
        sums[0] = (sums[0] + (mixed & _LOW32).sum()) & _LOW32
        sums[1] = (sums[1] + logical_shift_right(mixed, 32).sum()) & _LOW32
    return sums


def _full_columns(value: torch.Tensor) -> int:
    size = value.size() if isinstance(value, ShardedTensor) else value.shape
    return int(size[1]) if len(size) > 1 else 1


def _named_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    state: dict[str, object] = {f"param/{k}": v for k, v in model.state_dict().items()}
    for param_key, param_state in optimizer.state_dict()["state"].items():
        if isinstance(param_state, dict):
            for state_name, value in param_state.items():
                state[f"optim/{param_key}/{state_name}"] = value
    return state


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> str:
    """16 hex digits identifying the full training state (collective: call on every rank)."""
    sums = torch.zeros(2, dtype=torch.int64)
    for name, value in sorted(_named_state(model, optimizer).items()):
        is_sharded = isinstance(value, ShardedTensor)
        if not is_sharded and not (isinstance(value, torch.Tensor) and not value.is_complex()):
            continue
        full_cols = _full_columns(value)
        for block in tensor_blocks(name, value):
            if block.replicated and rank != 0:
                continue
            tensor = block.tensor
            if tensor.dim() == 0:
                tensor = tensor.reshape(1)
            block_sums = _block_sums(name, tensor, block.row_offset, block.column_offset, full_cols)
            sums = (sums + block_sums.cpu()) & _LOW32
    if dist.is_initialized():
        sums = sums.to(collective_device())
        dist.all_reduce(sums)
        sums = sums.cpu()
    sums &= _LOW32
    return f"{int(sums[1]):08x}{int(sums[0]):08x}"
