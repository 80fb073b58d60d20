"""Feature and table specifications: what the model embeds and how big each table is.

A *feature* is one categorical input (``user_id``, ``ad_category``...) carrying raw int64 IDs.
Features are grouped (user side, ad side, context); each group becomes one TorchRec
EmbeddingBagCollection with one embedding dimension, so groups can be sharded and sized apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modules.hashing import HashingSpec, check_hashing, feature_tables

FLOAT32_BYTES = 4


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
            named after the feature (``name``, ``name_q``/``name_r``, ``name_weights``).
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
        if self.id_space <= 0:
            raise ValueError(f"feature {self.name}: id_space must be > 0, got {self.id_space}")
        if self.num_embeddings <= 0:
            raise ValueError(
                f"feature {self.name}: num_embeddings must be > 0, got {self.num_embeddings}"
            )
        if self.ids_per_sample <= 0:
            raise ValueError(
                f"feature {self.name}: ids_per_sample must be > 0, got {self.ids_per_sample}"
            )
        if self.zipf_exponent <= 0:
            raise ValueError(
                f"feature {self.name}: zipf_exponent must be > 0, got {self.zipf_exponent}"
            )
        check_hashing(self)


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
