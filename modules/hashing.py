"""Hashing methods as ordinary TorchRec tables: which tables and KJT keys each feature needs.

A raw ID is any int64; a feature's tables are sized by a memory budget, not by its vocabulary.
Every method is expressed with plain sum-pooled EmbeddingBagCollection tables, so every
sharding type and the planner apply unchanged; the raw-ID -> row mapping runs in front of the
collection (``modules/id_mapping.py``) and the per-method combination after the pooled lookup
(``modules/hash_combine.py``).

Methods (``HashingSpec.method``), for a feature ``f`` with ``R = num_embeddings`` rows:

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from modules.features import FeatureSpec

METHODS = ("none", "modulo", "hash", "multi_hash", "qr", "frequency", "managed")
EVICTION_POLICIES = ("distance_lfu", "lfu", "lru")  # managed: which IDs keep their rows
COMBINES = {"multi_hash": ("sum", "concat"), "qr": ("mult", "sum", "concat")}
DEFAULT_COMBINE = {"multi_hash": "sum", "qr": "mult"}


@dataclass(frozen=True)
class HashingSpec:
    """How one feature's raw IDs reach its table rows.

    Attributes:
        method: one of METHODS.
        num_hashes: multi_hash: k, the hashes (probes) per ID.
        combine: multi_hash: sum | concat; qr: mult | sum | concat; "" = the method's default.
        importance_rows: multi_hash: rows of the importance-weight table (0 = no weights).
        q: qr: rows of the remainder table; 0 = ceil(id_space / num_embeddings), so that
            the quotient table has about num_embeddings rows.
        frequent_ids: frequency: int64 [K] raw IDs, most frequent first, that get own rows.
        seed: salts every hash of the feature (a different seed = independent hashes).
        eviction_policy: managed: distance_lfu | lfu | lru.
        eviction_interval: managed: training steps between admissions of new IDs.
    """

    method: str = "modulo"
    num_hashes: int = 2
    combine: str = ""
    importance_rows: int = 0
    q: int = 0
    frequent_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)
    seed: int = 0
    eviction_policy: str = "distance_lfu"
    eviction_interval: int = 10

    @property
    def combine_or_default(self) -> str:
        return self.combine or DEFAULT_COMBINE.get(self.method, "")


def check_hashing(feature: FeatureSpec) -> None:
    """Raise ValueError (one line naming the feature and the key) for a spec that cannot run."""
    spec = feature.hashing
    where = f"feature {feature.name}: hashing"
    if spec.method not in METHODS:
        raise ValueError(f"{where}.method={spec.method!r} is not one of {', '.join(METHODS)}")
    if spec.method != "qr" and feature.num_embeddings > feature.id_space:
        raise ValueError(
            f"feature {feature.name}: num_embeddings={feature.num_embeddings} buckets is above "
            f"the declared id_space={feature.id_space} (a table never needs more rows than IDs)"
        )
    if spec.method == "multi_hash":
        if spec.num_hashes < 1:
            raise ValueError(f"{where}.num_hashes (k) must be >= 1, got {spec.num_hashes}")
        if spec.importance_rows < 0:
            raise ValueError(f"{where}.importance_rows must be >= 0, got {spec.importance_rows}")
        if spec.importance_rows > 0 and feature.ids_per_sample != 1:
            raise ValueError(
                f"{where}.importance_rows: importance weights are per ID and need one ID per "
                f"sample (after pooling a bag they no longer are), ids_per_sample="
                f"{feature.ids_per_sample}"
            )
    if spec.method in COMBINES and spec.combine_or_default not in COMBINES[spec.method]:
        raise ValueError(
            f"{where}.combine={spec.combine!r} is not one of {', '.join(COMBINES[spec.method])} "
            f"for method {spec.method}"
        )
    if spec.method == "qr":
        if spec.q != 0 and spec.q < 2:
            raise ValueError(f"{where}.q must be >= 2 (or 0 = from num_embeddings), got {spec.q}")
        if qr_remainder_rows(feature) > feature.id_space:
            raise ValueError(
                f"{where}.q={qr_remainder_rows(feature)} is above the declared "
                f"id_space={feature.id_space}"
            )
    if spec.method == "frequency":
        ids = spec.frequent_ids
        if ids is None or ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{where}: method frequency needs a non-empty list of frequent IDs")
        if ids.numel() >= feature.num_embeddings:
            raise ValueError(
                f"{where}: {ids.numel()} frequent IDs leave no row of num_embeddings="
                f"{feature.num_embeddings} for the other IDs"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(f"{where}: the frequent IDs contain duplicates")
    if spec.method == "managed":
        if feature.num_embeddings < 2:
            raise ValueError(
                f"{where}: method managed needs num_embeddings >= 2 (one row is shared by the "
                f"IDs without a row of their own), got {feature.num_embeddings}"
            )
        if spec.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"{where}.eviction_policy={spec.eviction_policy!r} is not one of "
                f"{', '.join(EVICTION_POLICIES)}"
            )
        if spec.eviction_interval < 1:
            raise ValueError(
                f"{where}.eviction_interval must be >= 1 step, got {spec.eviction_interval}"
            )


def qr_remainder_rows(feature: FeatureSpec) -> int:
    """q: the remainder table's rows (explicit, or sized so the quotient has ~R rows)."""
    if feature.hashing.q:
        return feature.hashing.q
    return max(2, math.ceil(feature.id_space / feature.num_embeddings))


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

