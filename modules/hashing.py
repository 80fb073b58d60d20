"""Hashing methods as ordinary TorchRec tables: which tables and KJT keys each feature needs.

A raw ID is any int64; a feature's tables are sized by a memory budget, not by its vocabulary.
Every method is expressed with plain sum-pooled EmbeddingBagCollection tables, so every
sharding type and the planner apply unchanged; the raw-ID -> row mapping runs in front of the
collection (``modules/id_mapping.py``) and the per-method combination after the pooled lookup
(``modules/hash_combine.py``).

Methods (``HashingSpec.method``; the spec and its checks are in ``modules/features.py``), for a
feature ``f`` with ``R = num_embeddings`` rows:

* ``none``: IDs must already lie in [0, R); table ``f``, key ``f``.
* ``modulo``: row = ID mod R (the baseline; sequential or strided IDs collide in patterns).
* ``hash``: row = h(ID) mod R (Weinberger et al. 2009); table ``f``, key ``f``.
* ``multi_hash``: k independent hashes probe one shared table ``f`` (keys ``f#h0..f#h{k-1}``,
  one TorchRec table with several feature names); the k pooled vectors are summed or
  concatenated. With ``importance_rows > 0`` a small hashed table ``f_weights`` (key ``f#w``)
  holds k learned importance weights per ID (hash embeddings, Svenstrup et al. 2017),
  parametrised as 1 + w so that zero-centred init starts from a plain sum.
* ``qr``: quotient-remainder compositional embeddings (Shi et al. 2020): the ID is hashed into
  a virtual index v in [0, ceil(N/q) q) (N = declared ID space), then tables ``f_q``
  (ceil(N/q) rows, key ``f#q`` = v // q) and ``f_r`` (q rows, key ``f#r`` = v mod q) are
  combined by mult, sum or concat. As in the DLRM reference code, combination is after pooling.
* ``frequency``: the K most frequent IDs (``frequent_ids``, most frequent first) get rows
  0..K-1 of their own; every other ID is hashed into rows K..R-1 (Zhang et al. 2020).
* ``managed``: TorchRec's managed-collision (MCH) modules: IDs are hashed into a 63-bit space,
  then a learned map gives the most valuable ones (by ``eviction_policy``) rows of their own,
  and the rest share the last row of each rank's shard (``modules/managed_collisions.py``).
  Table ``f``, key ``f``, in a ManagedCollisionEmbeddingBagCollection that TorchRec shards
  row-wise only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modules.features import FeatureGroupSpec, FeatureSpec, all_features, qr_remainder_rows


def qr_virtual_size(feature: FeatureSpec) -> int:
    """ceil(N / q) * q: the hashed index space that QR factorises without collisions."""
    q = qr_remainder_rows(feature)
    return math.ceil(feature.id_space / q) * q


def importance_dim(num_hashes: int) -> int:
    """Importance-weight table dim: k, rounded up to 4 so column-wise sharding can split it."""
    return 4 * math.ceil(num_hashes / 4)


@dataclass(frozen=True)
class TableSpec:
    """One TorchRec table: its name, shape, and the KJT keys (feature names) that read it."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]


def probe_key(feature_name: str, index: int) -> str:
    return f"{feature_name}#h{index}"


def feature_tables(feature: FeatureSpec, embedding_dim: int) -> list[TableSpec]:
    """The tables a feature needs, in the order their keys appear in the mapped KJT."""
    spec, name = feature.hashing, feature.name
    if spec.method == "multi_hash":
        keys = tuple(probe_key(name, i) for i in range(spec.num_hashes))
        tables = [TableSpec(name, feature.num_embeddings, embedding_dim, keys)]
        if spec.importance_rows > 0:
            tables.append(
                TableSpec(
                    f"{name}_weights",
                    spec.importance_rows,
                    importance_dim(spec.num_hashes),
                    (f"{name}#w",),
                )
            )
        return tables
    if spec.method == "qr":
        q = qr_remainder_rows(feature)
        return [
            TableSpec(f"{name}_q", qr_virtual_size(feature) // q, embedding_dim, (f"{name}#q",)),
            TableSpec(f"{name}_r", q, embedding_dim, (f"{name}#r",)),
        ]
    return [TableSpec(name, feature.num_embeddings, embedding_dim, (name,))]


def feature_keys(feature: FeatureSpec) -> list[str]:
    """The mapped KJT keys of a feature, in table order."""
    return [key for table in feature_tables(feature, 1) for key in table.feature_names]


def feature_output_dim(feature: FeatureSpec, embedding_dim: int) -> int:
    """Dim of the feature's combined pooled vector: D, or k D / 2 D for concat."""
    spec = feature.hashing
    if spec.combine_or_default == "concat":
        return embedding_dim * (spec.num_hashes if spec.method == "multi_hash" else 2)
    return embedding_dim


def feature_rows(feature: FeatureSpec) -> int:
    """Rows over all of a feature's tables."""
    return sum(table.num_embeddings for table in feature_tables(feature, 1))



def check_unique_names(groups: list[FeatureGroupSpec]) -> None:
    """Feature, table and group names key batches, tables and reports: each must be unique."""
    seen: set[str] = set()
    for feature in all_features(groups):
        if feature.name in seen:
            raise ValueError(f"feature {feature.name} is declared twice")
        seen.add(feature.name)
    tables: dict[str, str] = {}
    for group in groups:
        for feature in group.features:
            for table in feature_tables(feature, group.embedding_dim):
                if table.name in tables:
                    raise ValueError(
                        f"table {table.name} (of feature {feature.name}) clashes with a table of "
                        f"feature {tables[table.name]}; rename one of the features"
                    )
                tables[table.name] = feature.name
    group_names = [group.name for group in groups]
    if len(set(group_names)) != len(group_names):
        raise ValueError(f"feature group names must be unique, got {group_names}")
