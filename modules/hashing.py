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
* ``shared``: every feature of a group with this method hashes into ONE table of the group,
  ``<group>_shared`` (unified embedding / feature multiplexing, Coleman et al. 2023): row =
  h(ID, salt of the feature) mod S, so the same raw ID of two features lands on independent
  rows, and rows go to whichever feature's IDs are there. The table's rows S are the sum of
  its features' ``num_embeddings`` (each feature brings the rows it would have had alone), so
  whatever sizes the features (a compression ratio, a budget) buys the same rows as for
  ``hash``. Its feature names are the features' own keys (``f``): TorchRec pools each key on
  its own, so every feature still gets its own pooled vector and nothing is combined.
  Features of different groups never share (groups may have different dims).

Every table of a job comes from ``group_tables``: it is the one place that knows a shared
table holds several features; ``feature_tables`` answers for the other methods only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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


def shared_table_name(group_name: str) -> str:
    """The name of a group's shared table."""
    return f"{group_name}_shared"


def shared_features(features: Sequence[FeatureSpec]) -> list[FeatureSpec]:
    """The features (of one group) with method shared, in feature order: one table's features."""
    return [feature for feature in features if feature.hashing.method == "shared"]


def shared_table_rows(features: Sequence[FeatureSpec]) -> int:
    """Rows of the shared table of a group with these features: the sum of the shared
    features' ``num_embeddings`` (0 when none shares)."""
    return sum(feature.num_embeddings for feature in shared_features(features))


def feature_tables(feature: FeatureSpec, embedding_dim: int) -> list[TableSpec]:
    """The tables a feature needs, in the order their keys appear in the mapped KJT.

    A feature with method shared owns no table (its rows are in its group's): ask
    ``group_tables``."""
    spec, name = feature.hashing, feature.name
    if spec.method == "shared":
        raise ValueError(
            f"feature {name}: hashing shared puts its rows into its group's table; "
            f"group_tables lists it"
        )
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


def group_tables(group: FeatureGroupSpec) -> list[TableSpec]:
    """The group's tables in feature order: one per feature, or several where its hashing
    method says so (``f_q``/``f_r`` for QR, ``f_weights`` for importance weights), and the
    group's shared table, if any of its features is shared, where the first of them is."""
    return [table for table, _ in tables_with_features(group)]


def tables_with_features(
    group: FeatureGroupSpec,
) -> list[tuple[TableSpec, tuple[FeatureSpec, ...]]]:
    """``group_tables``, each with the features whose IDs it holds (several only for the
    shared table)."""
    sharing = tuple(shared_features(group.features))
    tables: list[tuple[TableSpec, tuple[FeatureSpec, ...]]] = []
    for feature in group.features:
        if feature.hashing.method != "shared":
            tables += [(t, (feature,)) for t in feature_tables(feature, group.embedding_dim)]
        elif feature is sharing[0]:
            table = TableSpec(
                shared_table_name(group.name),
                shared_table_rows(group.features),
                group.embedding_dim,
                tuple(f.name for f in sharing),
            )
            tables.append((table, sharing))
    return tables


def table_order(features: Sequence[FeatureSpec]) -> list[int]:
    """Indices of a group's ``features`` in the order their keys appear in ``group_tables``:
    feature order, except that the shared features sit together, where the first of them is."""
    sharing = [i for i, f in enumerate(features) if f.hashing.method == "shared"]
    order: list[int] = []
    for index, feature in enumerate(features):
        if feature.hashing.method != "shared":
            order.append(index)
        elif index == sharing[0]:
            order += sharing
    return order


def feature_keys(feature: FeatureSpec) -> list[str]:
    """The mapped KJT keys of a feature, in table order (shared: the feature's name, one of
    its group table's feature names)."""
    if feature.hashing.method == "shared":
        return [feature.name]
    return [key for table in feature_tables(feature, 1) for key in table.feature_names]


def feature_output_dim(feature: FeatureSpec, embedding_dim: int) -> int:
    """Dim of the feature's combined pooled vector: D, or k D / 2 D for concat."""
    spec = feature.hashing
    if spec.combine_or_default == "concat":
        return embedding_dim * (spec.num_hashes if spec.method == "multi_hash" else 2)
    return embedding_dim


def feature_rows(feature: FeatureSpec) -> int:
    """Rows over all of a feature's tables (shared: the rows it brings to its group's)."""
    if feature.hashing.method == "shared":
        return feature.num_embeddings
    return sum(table.num_embeddings for table in feature_tables(feature, 1))


def check_unique_names(groups: list[FeatureGroupSpec]) -> None:
    """Feature, table and group names key batches, tables and reports: each must be unique."""
    seen: set[str] = set()
    for feature in all_features(groups):
        if feature.name in seen:
            raise ValueError(f"feature {feature.name} is declared twice")
        seen.add(feature.name)
    group_names = [group.name for group in groups]
    if len(set(group_names)) != len(group_names):
        raise ValueError(f"feature group names must be unique, got {group_names}")
    tables: dict[str, str] = {}
    for group in groups:
        for table, features in tables_with_features(group):
            owner = _owner(group, features)
            if table.name in tables:
                raise ValueError(
                    f"table {table.name} (of {owner}) clashes with a table of "
                    f"{tables[table.name]}; rename one of them"
                )
            tables[table.name] = owner


def _owner(group: FeatureGroupSpec, features: tuple[FeatureSpec, ...]) -> str:
    """Whose table it is, in words: the feature, or the group and the features sharing it."""
    if features[0].hashing.method == "shared":
        return f"group {group.name}, shared by features {', '.join(f.name for f in features)}"
    return f"feature {features[0].name}"
