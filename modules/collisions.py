"""What hashing costs: expected collisions (balls into bins) and collisions measured on data.

Collision rate, both ways, = 1 - distinct rows / distinct raw IDs: the fraction of IDs that
do not get a vector of their own. A "row" is the whole signature an ID is looked up by (the k
probes of multi_hash plus its importance row, the (quotient, remainder) pair of qr), so two IDs
collide only when every part of their lookup is the same. In a shared table (method shared)
the "IDs" are (feature, ID) pairs of all the features sharing it: an ID of one feature on a
row another feature's ID uses collides with it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from modules.features import FeatureSpec
from modules.hashing import qr_virtual_size, shared_table_rows


def expected_occupied_bins(num_ids: float, num_bins: float) -> float:
    """E[non-empty bins] after ``num_ids`` balls land uniformly in ``num_bins`` bins:
    m (1 - (1 - 1/m)^n), computed stably for huge n and m."""
    if num_ids <= 0:
        return 0.0
    if num_bins <= 1:
        return 1.0
    return -num_bins * math.expm1(num_ids * math.log1p(-1.0 / num_bins))


def occupied_bins_std(num_ids: int, num_bins: int) -> float:
    """Standard deviation of the number of non-empty bins after ``num_ids`` balls land
    uniformly in ``num_bins`` bins (it is that of the empty bins, E):

        Var E = m (m - 1) (1 - 2/m)^n + m (1 - 1/m)^n - m^2 (1 - 1/m)^(2n)

    How far a measured collision count may stray from ``expected_occupied_bins`` by chance."""
    if num_ids <= 0 or num_bins <= 1:
        return 0.0
    n, m = num_ids, num_bins
    empty_one = math.exp(n * math.log1p(-1.0 / m))  # P(a given bin is empty)
    empty_two = math.exp(n * math.log1p(-2.0 / m)) if m > 2 else 0.0  # both of two given bins
    variance = m * (m - 1) * empty_two + m * empty_one - (m * empty_one) ** 2
    return math.sqrt(max(0.0, variance))


def expected_collision_rate(num_ids: float, num_bins: float) -> float:
    """1 - E[occupied bins] / n for n distinct IDs hashed uniformly into m bins."""
    if num_ids <= 0:
        return 0.0
    return max(0.0, 1.0 - expected_occupied_bins(num_ids, num_bins) / num_ids)


def feature_expected_collision_rate(feature: FeatureSpec, num_ids: float | None = None) -> float:
    """Expected collision rate of a feature's mapping for ``num_ids`` distinct IDs (default:
    its declared ID space), treating its hashes (and modulo) as uniform.

    none: 0 (IDs are rows). frequency: the K frequent IDs have own rows, the other n - K are
    hashed into R - K rows. multi_hash: bins = R^k (times the importance rows).
    qr: bins = the hashed virtual index space ceil(N/q) q, which QR factorises exactly.
    managed: at best (the map holds the right IDs) R - 1 IDs own a row and the rest share the
    last one, so n IDs reach min(n, R) rows. shared: depends on every feature of the table,
    see ``shared_expected_collision_rate``.
    """
    spec = feature.hashing
    n = float(feature.id_space if num_ids is None else num_ids)
    rows = float(feature.num_embeddings)
    if spec.method == "none":
        return 0.0
    if spec.method in ("modulo", "hash"):
        return expected_collision_rate(n, rows)
    if spec.method == "multi_hash":
        bins = rows**spec.num_hashes * max(1, spec.importance_rows)
        return expected_collision_rate(n, bins)
    if spec.method == "qr":
        return expected_collision_rate(n, float(qr_virtual_size(feature)))
    if spec.method == "frequency":
        num_frequent = float(spec.frequent_ids.numel())  # type: ignore[union-attr]
        if n <= num_frequent:
            return 0.0
        occupied = num_frequent + expected_occupied_bins(n - num_frequent, rows - num_frequent)
        return max(0.0, 1.0 - occupied / n)
    if spec.method == "managed":
        return max(0.0, 1.0 - min(n, rows) / n) if n > 0 else 0.0
    if spec.method == "shared":
        raise ValueError(
            f"feature {feature.name}: hashing shared: its collisions depend on every feature "
            f"of its table (shared_expected_collision_rate)"
        )
    raise ValueError(f"feature {feature.name}: unknown hashing method {spec.method!r}")


def shared_expected_collision_rate(
    features: Sequence[FeatureSpec], num_ids: float | None = None
) -> float:
    """Expected collision rate of a group's shared table, whose ``features`` (those with
    method shared) hash into its rows: the IDs of all of them compete for all its rows, so
    n = the sum of their declared ID spaces (or ``num_ids`` distinct (feature, ID) pairs) in
    ``shared_table_rows`` bins. Every pair is equally likely to collide, so each feature of
    the table has the table's rate."""
    n = float(sum(f.id_space for f in features) if num_ids is None else num_ids)
    return expected_collision_rate(n, float(shared_table_rows(features)))


def distinct_signatures(rows: torch.Tensor) -> int:
    """Distinct rows of an int64 [N, C] signature matrix."""
    if rows.numel() == 0:
        return 0
    return int(torch.unique(rows, dim=0).shape[0])


def measured_collision_rate(num_distinct_ids: int, num_distinct_rows: int) -> float:
    """1 - distinct rows / distinct IDs (0 when nothing was seen)."""
    if num_distinct_ids == 0:
        return 0.0
    return 1.0 - num_distinct_rows / num_distinct_ids
