"""Raw IDs -> table rows. The one place where raw IDs meet table sizes.

Batches carry raw int64 IDs (any value). Before the embedding lookup, each feature's IDs
are mapped onto its tables' rows by its hashing method (``modules/hashing.py``). The mapper is
part of the model (the same mapping runs at serving time; frequency tables are buffers in its
state dict) and runs as a KJT -> KJT step in front of each EmbeddingBagCollection;
TrainPipelineSparseDist pipelines it as a "postproc" module when built with
``pipeline_postproc=True``, so input distribution still overlaps compute.

One vectorised pass serves every method: each *output* key (a feature, or one of its probes
or QR parts) has parameters (salt, whether to hash, moduli, divisor, row offset) and

    base = hash64(id, salt) & (2^63 - 1)  if the key hashes, else id
    row  = ((base mod m1) div d) mod m2 + offset

so the default job pays one hash over all its IDs, not one small kernel chain per feature.

No host-device sync in ``forward``: the lengths per key come from the host with the KJT (the
data sources build every KJT with them), and the counts that size the per-value parameters are
summed on the device. The range check of method ``none`` is immediate by default (a
``bool(tensor)``, a sync on GPU); a training loop switches it to *deferred* (see
``defer_range_errors``), where the first bad ID is recorded on the device and raised later, at
a step that syncs anyway.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.features import FeatureSpec, qr_remainder_rows
from modules.hash_functions import non_negative, seed_salt, splitmix64
from modules.hashing import feature_keys, qr_virtual_size, shared_table_rows, table_order
from modules.managed_collisions import MANAGED_INPUT_SPACE

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
# Rows of the per-key parameter table.
# _LOWER/_UPPER: the inclusive ID range a key accepts (method none only; else all of int64).
_SALT, _USE_HASH, _MOD1, _DIV, _MOD2, _OFFSET, _LOWER, _UPPER = range(8)
# Method frequency keeps, per frequent ID, the ID and its row (two int64 buffers below).
FREQUENT_ID_BYTES = 16


def _key_parameters(feature: FeatureSpec, shared_rows: int) -> list[list[int]]:
    """One parameter column per output key of the feature (see the module docstring);
    ``shared_rows``: the rows of its group's shared table (method shared)."""
    spec, rows = feature.hashing, feature.num_embeddings

    def salt(*parts: int | str) -> int:
        return seed_salt(spec.seed, "id-hash", feature.name, *parts)

    def column(salt_value=0, use_hash=1, mod1=rows, div=1, mod2=None, offset=0,
               lower=_INT64_MIN, upper=_INT64_MAX) -> list[int]:
        return [salt_value, use_hash, mod1, div, mod1 if mod2 is None else mod2, offset,
                lower, upper]

    method = spec.method
    if method == "none":
        return [column(use_hash=0, lower=0, upper=rows - 1)]
    if method == "modulo":
        return [column(use_hash=0)]
    if method == "hash":
        return [column(salt(0))]
    if method == "multi_hash":
        columns = [column(salt(i)) for i in range(spec.num_hashes)]
        if spec.importance_rows > 0:
            columns.append(column(salt("importance"), mod1=spec.importance_rows))
        return columns
    if method == "qr":
        q, virtual = qr_remainder_rows(feature), qr_virtual_size(feature)
        return [
            column(salt(0), mod1=virtual, div=q, mod2=virtual // q),
            column(salt(0), mod1=virtual, mod2=q),
        ]
    if method == "frequency":
        num_frequent = spec.frequent_ids.numel()  # type: ignore[union-attr]
        return [column(salt(0), mod1=rows - num_frequent, offset=num_frequent)]
    if method == "managed":
        # Not a row yet: a 63-bit hashed ID that the MCH module behind the mapper maps to a row.
        return [column(salt(0), mod1=MANAGED_INPUT_SPACE)]
    if method == "shared":
        # The salt is the feature's (its name is in it): one raw ID of two features lands on
        # two independent rows of the one table.
        return [column(salt(0), mod1=shared_rows)]
    raise ValueError(f"feature {feature.name}: unknown hashing method {method!r}")


class HashingIdMapper(nn.Module):
    """Maps a group's KJT of raw IDs to the KJT its EmbeddingBagCollection reads.

    Args:
        features: the group's features, in the input KJT's key order (all of them: the
            shared ones together size the group's shared table).
        mapped: names of the features to map (default: all); the output holds only their
            keys. A group whose managed features sit in a collection of their own has one
            mapper per collection, each reading the group's KJT.

    Input: KJT with keys = the features' names, values = raw int64 IDs [sum of lengths].
    Output: KJT with keys = every feature's mapped keys in table order (a feature ``f`` with
    method multi_hash gives ``f#h0..f#h{k-1}`` and maybe ``f#w``, qr gives ``f#q, f#r``; shared
    gives ``f``, rows of the group's shared table), each key carrying its source feature's
    lengths and int64 rows.

    Example::

        mapper = HashingIdMapper([FeatureSpec("user_id", 10**9, 1000,
                                              hashing=HashingSpec("hash"))])
        rows = mapper(KeyedJaggedTensor(["user_id"], torch.tensor([12345, -7]),
                                        lengths=torch.tensor([1, 1])))
        # rows.values(): two rows in [0, 1000)
    """

    def __init__(self, features: list[FeatureSpec], mapped: list[str] | None = None) -> None:
        super().__init__()
        self.input_keys = [feature.name for feature in features]
        self.output_keys: list[str] = []
        source: list[int] = []
        columns: list[list[int]] = []
        # Keys in the collection's order (its tables' feature names, concatenated), which
        # differs from feature order when a shared table's features are not neighbours.
        features_mapped = [
            (i, features[i]) for i in table_order(features)
            if mapped is None or features[i].name in mapped
        ]
        shared_rows = shared_table_rows(features)
        for index, feature in features_mapped:
            keys = feature_keys(feature)
            self.output_keys += keys
            source += [index] * len(keys)
            columns += _key_parameters(feature, shared_rows)
        # Output key -> index of the input feature it reads.
        self.source_index = source
        self.expands = self.output_keys != self.input_keys
        self.has_range_check = any(f.hashing.method == "none" for _, f in features_mapped)
        # Deferred range errors (set by the training loop): forward records the first bad ID in
        # ``out_of_range`` instead of raising; ``out_of_range_error`` turns it into the error.
        self.defer_range_errors = False
        self.hashes = any(column[_USE_HASH] for column in columns)
        self.factorises = any(c[_DIV] != 1 or c[_MOD2] != c[_MOD1] for c in columns)
        # A buffer so it follows the model to its device; [8, num_output_keys].
        self.register_buffer(
            "key_parameters", torch.tensor(columns, dtype=torch.int64).t().contiguous(),
            persistent=False,
        )
        self.register_buffer(
            "source", torch.tensor(source, dtype=torch.int64), persistent=False
        )
        # The first out-of-range ID met in deferred mode: (found 0/1, output key index, raw ID).
        self.register_buffer("out_of_range", torch.zeros(3, dtype=torch.int64), persistent=False)
        # Frequency features: their IDs sorted (for searchsorted) and each one's own row.
        # Persistent: the mapping is part of the model and saved with it.
        self.frequency_keys: list[int] = []
        for _, feature in features_mapped:
            if feature.hashing.method != "frequency":
                continue
            ids = feature.hashing.frequent_ids.to(torch.int64)  # type: ignore[union-attr]
            sorted_ids, order = torch.sort(ids)
            key_index = self.output_keys.index(feature.name)
            self.frequency_keys.append(key_index)
            self.register_buffer(f"frequent_ids_{key_index}", sorted_ids)
            self.register_buffer(f"frequent_rows_{key_index}", order)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if features.keys() != self.input_keys:
            raise ValueError(
                f"id mapper expects keys {self.input_keys}, got {features.keys()}"
            )
        # Host lists: free when the KJT was built with them (every data source does); else
        # TorchRec computes them from the lengths with .tolist(), a host-device sync on GPU.
        input_lengths_per_key = features.length_per_key()
        values, lengths = features.values(), features.lengths()
        stride = features.stride()
        # IDs per output key on the device, to size the per-value parameters: summing the
        # lengths there avoids copying the host list to the device (a blocking copy from
        # pageable memory) in every step.
        ids_per_key = lengths.view(len(self.input_keys), stride).sum(dim=1)
        if self.expands:
            offsets = features.offset_per_key()
            values = torch.cat(
                [values[offsets[s] : offsets[s + 1]] for s in self.source_index]
            )
            lengths = lengths.view(len(self.input_keys), -1)[self.source].reshape(-1)
            lengths_per_key = [input_lengths_per_key[s] for s in self.source_index]
            ids_per_key = ids_per_key[self.source]
        else:
            lengths_per_key = input_lengths_per_key
        parameters = torch.repeat_interleave(
            self.key_parameters, ids_per_key, dim=1, output_size=values.numel()
        )
        if self.has_range_check:
            self._check_range(values, parameters, lengths_per_key, ids_per_key)
        base = values
        if self.hashes:
            # hash64 with a per-value salt: splitmix64(id xor salt of its key or probe).
            hashed = non_negative(splitmix64(values ^ parameters[_SALT]))
            base = torch.where(parameters[_USE_HASH].bool(), hashed, values)
        # For method none, mod1 is the table's rows: even an out-of-range ID that is only
        # recorded (deferred mode) lands on a real row, so no lookup kernel reads out of bounds.
        rows = torch.remainder(base, parameters[_MOD1])
        if self.factorises:
            rows = torch.remainder(torch.div(rows, parameters[_DIV], rounding_mode="floor"),
                                   parameters[_MOD2])
        rows = rows + parameters[_OFFSET]
        if self.frequency_keys:
            rows = self._frequent_rows(values, rows, lengths_per_key)
        return KeyedJaggedTensor(
            keys=self.output_keys,
            values=rows,
            lengths=lengths,
            stride=stride,
            # Carried on, so the sharded collection's input dist need not recompute them.
            length_per_key=lengths_per_key,
            offset_per_key=_cumulative(lengths_per_key),
        )

    def _check_range(
        self,
        values: torch.Tensor,
        parameters: torch.Tensor,
        lengths_per_key: list[int],
        ids_per_key: torch.Tensor,
    ) -> None:
        """Method ``none``: IDs outside [0, rows) are an input error, never a silent wrap.

        Immediate mode raises here; ``bool(bad.any())`` is a host-device sync on GPU, fine for
        tools and tests. Deferred mode (training) keeps the step free of syncs: the first bad
        ID is recorded on the device, with ops only, and raised at the next step that syncs
        anyway (see ``out_of_range_error``).
        """
        bad = (values < parameters[_LOWER]) | (values > parameters[_UPPER])
        if self.defer_range_errors:
            if values.numel() > 0:  # host metadata: no sync
                self._record_first_bad(values, bad, ids_per_key)
            return
        if bool(bad.any()):
            position = int(torch.nonzero(bad)[0])
            key_index, start = 0, 0
            while start + lengths_per_key[key_index] <= position:
                start += lengths_per_key[key_index]
                key_index += 1
            raise self._error(key_index, int(values[position]))

    def _record_first_bad(
        self, values: torch.Tensor, bad: torch.Tensor, ids_per_key: torch.Tensor
    ) -> None:
        """Device ops only: keep the first (found, key index, raw ID) until it is read."""
        # argmax returns the first maximal index: the first bad ID, or 0 when there is none.
        position = torch.argmax(bad.view(torch.uint8), dim=0, keepdim=True)
        key_index = (torch.cumsum(ids_per_key, dim=0) <= position).sum(dim=0, keepdim=True)
        # [bad there (0/1), its key, its raw ID]; cat promotes the flag to int64.
        candidate = torch.cat([bad.gather(0, position), key_index, values.gather(0, position)])
        recorded = self.out_of_range[:1] != 0
        self.out_of_range.copy_(torch.where(recorded, self.out_of_range, candidate))

    def out_of_range_error(self, record: list[int]) -> IdOutOfRangeError | None:
        """The error a record read from ``out_of_range`` stands for (None: no bad ID)."""
        found, key_index, raw_id = record
        return self._error(key_index, raw_id) if found else None

    def _error(self, key_index: int, raw_id: int) -> IdOutOfRangeError:
        rows = int(self.key_parameters[_UPPER, key_index]) + 1
        return IdOutOfRangeError(
            f"feature {self.output_keys[key_index]} (hashing none): raw ID {raw_id} is outside "
            f"[0, {rows}); use hashing modulo or hash for IDs that are not already row numbers"
        )

    def _frequent_rows(
        self, values: torch.Tensor, rows: torch.Tensor, lengths_per_key: list[int]
    ) -> torch.Tensor:
        """Frequent IDs take their own row (their rank); the rest keep their hashed row."""
        starts = _cumulative(lengths_per_key)
        pieces = []
        previous = 0
        for key_index in self.frequency_keys:
            start, stop = starts[key_index], starts[key_index + 1]
            sorted_ids = getattr(self, f"frequent_ids_{key_index}")
            own_rows = getattr(self, f"frequent_rows_{key_index}")
            ids = values[start:stop]
            position = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
            found = sorted_ids[position] == ids
            own = torch.where(found, own_rows[position], rows[start:stop])
            pieces += [rows[previous:start], own]
            previous = stop
        pieces.append(rows[previous:])
        return torch.cat(pieces)

    def feature_rows(self, feature_name: str, raw_ids: torch.Tensor) -> torch.Tensor:
        """The rows one feature's raw IDs map to, through the very same forward.

        Args:
            raw_ids: int64 [N] IDs of ``feature_name``.
        Returns:
            int64 [N, C]: a row per mapped key of the feature (C = 1, k, k + 1 or 2).
        """
        num_keys = len(self.input_keys)
        lengths = torch.zeros(num_keys, raw_ids.numel(), dtype=torch.int32)
        lengths[self.input_keys.index(feature_name)] = 1
        mapped = self(
            KeyedJaggedTensor(
                keys=self.input_keys, values=raw_ids.to(torch.int64), lengths=lengths.reshape(-1)
            )
        ).to_dict()
        keys = [
            key for key, s in zip(self.output_keys, self.source_index)
            if self.input_keys[s] == feature_name
        ]
        return torch.stack([mapped[key].values() for key in keys], dim=1)


def _cumulative(lengths: list[int]) -> list[int]:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets


class IdOutOfRangeError(ValueError):
    """A raw ID that a feature with hashing ``none`` cannot take; one line naming both."""
