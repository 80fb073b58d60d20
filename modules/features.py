"""The feature schema: frozen specs of what the model embeds, how big each table is, and how
raw IDs reach its rows, with every check of them.

A *feature* is one categorical input (``user_id``, ``ad_category``...) carrying raw int64 IDs.
Features are grouped (user side, ad side, context); each group becomes one TorchRec
EmbeddingBagCollection with one embedding dimension, so groups can be sharded and sized apart.

These are plain dataclasses: ``train/config.py`` is the Hydra schema that builds them, and
checks its hashing keys with ``check_hashing_option`` below, so each check and its one-line
message live here. The tables each hashing method implies are in ``modules/hashing.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FLOAT32_BYTES = 4

# Hashing methods (modules/hashing.py describes each), and their options' allowed values.
METHODS = ("none", "modulo", "hash", "multi_hash", "qr", "frequency", "managed", "shared")
EVICTION_POLICIES = ("distance_lfu", "lfu", "lru")  # managed: which IDs keep their rows
COMBINES = {"multi_hash": ("sum", "concat"), "qr": ("mult", "sum", "concat")}
DEFAULT_COMBINE = {"multi_hash": "sum", "qr": "mult"}
ALL_COMBINES = ("sum", "concat", "mult")
# Methods whose tables may have more rows than the ID space (fewer collisions).
ROWS_ABOVE_ID_SPACE = ("hash", "multi_hash", "shared")


def check_hashing_option(where: str, option: str, value: Any) -> None:
    """Raise a one-line ValueError naming ``where`` (the config key or feature that set it)
    when a hashing option's value is one no feature could use.

    Checks that depend on the method or on the feature (its rows, ID space) are in
    ``FeatureSpec``; this one also runs on the config, before any feature exists.
    """
    if option in ("method", "eviction_policy", "combine"):
        choices = {"method": METHODS, "eviction_policy": EVICTION_POLICIES,
                   "combine": ALL_COMBINES}[option]
        if value not in choices:
            raise ValueError(f"{where}={value!r} is not one of {', '.join(choices)}")
    elif option == "num_hashes":
        if value < 1:
            raise ValueError(f"{where} (k) must be >= 1, got {value}")
    elif option == "q":
        if value != 0 and value < 2:
            raise ValueError(f"{where} must be >= 2 (or 0 = sized from num_embeddings), got {value}")
    elif option == "importance_rows":
        if value < 0:
            raise ValueError(f"{where} must be >= 0, got {value}")
    elif option in ("num_frequent", "eviction_interval"):
        if value <= 0:
            raise ValueError(f"{where} must be > 0, got {value}")
    else:
        raise KeyError(f"no hashing option {option!r}")


@dataclass(frozen=True)
class HashingSpec:
    """How one feature's raw IDs reach its table rows (checked by the feature that holds it).

    Attributes:
        method: one of METHODS (modules/hashing.py describes each).
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


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical feature and the table its IDs land in.

    Attributes:
        name: feature key in batches and summaries.
        id_space: declared number of distinct raw IDs (the vocabulary the table would need
            without hashing); used for memory and collision reports.
        num_embeddings: rows of the feature's table.
        ids_per_sample: IDs per sample (1 = one-hot; more = a multi-hot bag, sum-pooled).
        zipf_exponent: synthetic data only: popularity skew of the IDs (larger = more skewed).
        signal_weight: synthetic data only: how strongly this feature drives the planted click
            probability (0 = pure noise feature).
        scramble_ids: synthetic data only: emit IDs as scrambled 63-bit values (as real hashed
            IDs look) instead of 0..id_space-1.
        hashing: how raw IDs reach rows (modules/hashing.py); the tables it implies may be
            named after the feature (``name``, ``name_q``/``name_r``, ``name_weights``) or,
            for method shared, after its group (``<group>_shared``).
    """

    name: str
    id_space: int
    num_embeddings: int
    ids_per_sample: int = 1
    zipf_exponent: float = 1.05
    signal_weight: float = 1.0
    scramble_ids: bool = True
    hashing: HashingSpec = field(default_factory=HashingSpec)

    def __post_init__(self) -> None:
        for key in ("id_space", "num_embeddings", "ids_per_sample", "zipf_exponent"):
            if getattr(self, key) <= 0:
                raise ValueError(f"feature {self.name}: {key} must be > 0, got {getattr(self, key)}")
        self._check_hashing()

    def _check_hashing(self) -> None:
        """Raise ValueError (one line naming the feature and the key) for hashing that cannot
        run on this feature."""
        spec = self.hashing
        where = f"feature {self.name}: hashing"
        for option in ("method", "num_hashes", "importance_rows", "q", "eviction_policy",
                       "eviction_interval"):
            check_hashing_option(f"{where}.{option}", option, getattr(spec, option))
        # Hashed IDs land on random rows: more rows than IDs means fewer collisions, so
        # hash, multi_hash and shared may have them (the hashing report says so); methods that
        # place IDs by value never use the extra rows.
        if spec.method not in ("qr", *ROWS_ABOVE_ID_SPACE) and self.num_embeddings > self.id_space:
            raise ValueError(
                f"feature {self.name}: num_embeddings={self.num_embeddings} buckets is above "
                f"the declared id_space={self.id_space} (a table never needs more rows than IDs)"
            )
        if spec.method == "multi_hash" and spec.importance_rows > 0 and self.ids_per_sample != 1:
            raise ValueError(
                f"{where}.importance_rows: importance weights are per ID and need one ID per "
                f"sample (after pooling a bag they no longer are), ids_per_sample="
                f"{self.ids_per_sample}"
            )
        if spec.method in COMBINES and spec.combine_or_default not in COMBINES[spec.method]:
            raise ValueError(
                f"{where}.combine={spec.combine!r} is not one of "
                f"{', '.join(COMBINES[spec.method])} for method {spec.method}"
            )
        if spec.method == "qr" and qr_remainder_rows(self) > self.id_space:
            raise ValueError(
                f"{where}.q={qr_remainder_rows(self)} is above the declared "
                f"id_space={self.id_space}"
            )
        if spec.method == "frequency":
            ids = spec.frequent_ids
            if ids is None or ids.dim() != 1 or ids.numel() == 0:
                raise ValueError(f"{where}: method frequency needs a non-empty list of frequent IDs")
            if ids.numel() >= self.num_embeddings:
                raise ValueError(
                    f"{where}: {ids.numel()} frequent IDs leave no row of num_embeddings="
                    f"{self.num_embeddings} for the other IDs"
                )
            if torch.unique(ids).numel() != ids.numel():
                raise ValueError(f"{where}: the frequent IDs contain duplicates")
        if spec.method == "managed" and self.num_embeddings < 2:
            raise ValueError(
                f"{where}: method managed needs num_embeddings >= 2 (one row is shared by the "
                f"IDs without a row of their own), got {self.num_embeddings}"
            )


def qr_remainder_rows(feature: FeatureSpec) -> int:
    """q: the remainder table's rows (explicit, or sized so the quotient has ~R rows)."""
    if feature.hashing.q:
        return feature.hashing.q
    return max(2, math.ceil(feature.id_space / feature.num_embeddings))


@dataclass(frozen=True)
class FeatureGroupSpec:
    """Features embedded by one EmbeddingBagCollection, all at ``embedding_dim``."""

    name: str
    embedding_dim: int
    features: tuple[FeatureSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0:
            raise ValueError(
                f"feature group {self.name}: embedding_dim must be > 0, got {self.embedding_dim}"
            )
        if not self.features:
            raise ValueError(f"feature group {self.name} has no features")

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]


def all_features(groups: list[FeatureGroupSpec]) -> list[FeatureSpec]:
    """Features of all groups in their canonical order (group order, then feature order)."""
    return [feature for group in groups for feature in group.features]
