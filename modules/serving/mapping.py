"""Raw IDs -> table rows for serving: every hashing method as plain tensor ops.

The training mapper (``modules/id_mapping.py``) reads a KJT's host-side sizes, raises on bad
IDs and, for managed features, hands off to TorchRec's MCH modules; none of that survives
``torchrec.fx.symbolic_trace`` + ``torch.jit.script``. This module computes the same rows
from the same per-key parameters with ops that do: no Python value is ever read from a
tensor, so the traced graph holds for any batch.

For every output key k (a feature, or one of its multi-hash probes or QR parts), reading
input feature ``source[k]``:

    base = splitmix64(id xor salt_k) & (2^63 - 1)  if key k hashes, else id
    row  = ((base mod m1_k) div d_k) mod m2_k + offset_k

then frequency keys give their listed IDs their own rows, and managed keys look the 63-bit
hashed ID up in the trained MCH map (all shards' maps merged and sorted), an ID outside the
map taking the last row of the shard whose ID range holds it, as the sharded TorchRec module
that trained it does (``modules/managed_collisions.py``).

Input: values int64 [sum of lengths], lengths int32 [F * B], key-major (feature after
feature, as a KJT lays them out). Output: rows int64 and lengths [K * B] for the K output keys.
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from modules.hash_functions import non_negative, splitmix64

# Rows of the parameter table, as in modules/id_mapping.py (_key_parameters).
SALT, USE_HASH, MOD1, DIV, MOD2, OFFSET = range(6)
_INT64_MAX = (1 << 63) - 1


@dataclass
class FrequentRows:
    """Frequency method: ``sorted_ids`` int64 [K] (ascending) and each one's own row [K]."""

    sorted_ids: torch.Tensor
    rows: torch.Tensor


@dataclass
class ManagedMap:
    """Managed method: the merged MCH map of a table and where each shard's rows end.

    Attributes:
        sorted_ids: int64 [R], hashed IDs ascending (empty slots = int64 max, at the end).
        rows: int64 [R], the row of each entry of ``sorted_ids``.
        fallback_rows: int64 [N], the last row of each of the N shards it was trained on.
        block_size: hashed IDs per shard: shard = hashed ID div block_size.
    """

    sorted_ids: torch.Tensor
    rows: torch.Tensor
    fallback_rows: torch.Tensor
    block_size: int


class ServingIdMapping(nn.Module):
    """Maps the raw IDs of F features (schema order) to rows of K output keys.

    Args:
        num_features: F.
        source: for each output key, the index of the input feature it reads [K].
        key_parameters: int64 [6, K]: salt, hashes (0/1), m1, d, m2, offset per key.
        frequent: output key index -> its FrequentRows.
        managed: output key index -> its ManagedMap.
    """

    def __init__(
        self,
        num_features: int,
        source: list[int],
        key_parameters: torch.Tensor,
        frequent: dict[int, FrequentRows],
        managed: dict[int, ManagedMap],
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("source", torch.tensor(source, dtype=torch.int64))
        self.register_buffer("key_index", torch.arange(len(source), dtype=torch.int64))
        self.register_buffer("key_parameters", key_parameters.to(torch.int64).contiguous())
        self.frequent_keys = sorted(frequent)
        for key in self.frequent_keys:
            self.register_buffer(f"frequent_ids_{key}", frequent[key].sorted_ids.contiguous())
            self.register_buffer(f"frequent_rows_{key}", frequent[key].rows.contiguous())
        self.managed_keys = sorted(managed)
        self.managed_block_sizes = {key: managed[key].block_size for key in self.managed_keys}
        for key in self.managed_keys:
            self.register_buffer(f"managed_ids_{key}", managed[key].sorted_ids.contiguous())
            self.register_buffer(f"managed_rows_{key}", managed[key].rows.contiguous())
            self.register_buffer(f"managed_fallback_{key}", managed[key].fallback_rows.contiguous())

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        per_feature = lengths.view(self.num_features, -1)  # [F, B]
        ids_per_feature = per_feature.sum(dim=1)
        feature_starts = torch.cumsum(ids_per_feature, dim=0) - ids_per_feature
        # Output values: key after key, each key a copy of its source feature's IDs.
        ids_per_key = ids_per_feature[self.source]
        key_of_value = torch.repeat_interleave(self.key_index, ids_per_key)
        key_starts = torch.cumsum(ids_per_key, dim=0) - ids_per_key
        position = torch.cumsum(torch.ones_like(key_of_value), dim=0) - 1
        within_key = position - key_starts[key_of_value]
        raw = values[feature_starts[self.source][key_of_value] + within_key]
        parameters = self.key_parameters.index_select(1, key_of_value)  # [6, V]
        hashed = non_negative(splitmix64(raw ^ parameters[SALT]))
        base = torch.where(parameters[USE_HASH] != 0, hashed, raw)
        rows = torch.remainder(base, parameters[MOD1])
        rows = torch.remainder(
            torch.div(rows, parameters[DIV], rounding_mode="floor"), parameters[MOD2]
        )
        rows = rows + parameters[OFFSET]
        for key in self.frequent_keys:
            sorted_ids = getattr(self, f"frequent_ids_{key}")
            own_rows = getattr(self, f"frequent_rows_{key}")
            found_at = torch.searchsorted(sorted_ids, raw).clamp(max=sorted_ids.numel() - 1)
            found = (sorted_ids[found_at] == raw) & (key_of_value == key)
            rows = torch.where(found, own_rows[found_at], rows)
        for key in self.managed_keys:
            sorted_ids = getattr(self, f"managed_ids_{key}")
            map_rows = getattr(self, f"managed_rows_{key}")
            fallback = getattr(self, f"managed_fallback_{key}")
            # rows holds the 63-bit hashed ID for this key (m1 = the MCH input space).
            found_at = torch.searchsorted(sorted_ids, rows).clamp(max=sorted_ids.numel() - 1)
            found = sorted_ids[found_at] == rows
            block_size = self.managed_block_sizes[key]
            if block_size > _INT64_MAX:  # one shard: the block is the whole 63-bit space
                shard = torch.zeros_like(rows)
            else:
                shard = torch.div(rows, block_size, rounding_mode="floor")
                shard = shard.clamp(min=0, max=fallback.numel() - 1)
            mapped = torch.where(found, map_rows[found_at], fallback[shard])
            rows = torch.where(key_of_value == key, mapped, rows)
        return rows, per_feature[self.source].reshape(-1)
