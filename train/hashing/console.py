"""The hashing report (train/hashing/report.py) and a hashing budget's choice as console tables."""

from __future__ import annotations

from typing import Any

from modules.collisions import feature_expected_collision_rate
from modules.features import FeatureGroupSpec
from train.hashing.budget import BudgetChoice
from train.hashing.report import feature_bytes
from train.sharding import OPTIMIZER_STATE_VALUES_PER_ROW, format_bytes


def format_hashing(report: dict[str, dict[str, Any]]) -> str:
    """The report as a console table, one line per feature."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    header = (
        f"{'feature':<20} {'method':<10} {'id space':>14} {'rows':>12} {'bytes':>10} "
        f"{'full table':>10} {'exp. coll.':>10} {'eval ids':>9} {'coll.':>7} {'exp.':>7}"
    )
    lines = ["hashing (collisions: declared ID space; eval window measured vs expected)", header]
    lines.append("-" * len(header))
    for name, entry in report.items():
        lines.append(
            f"{name:<20} {entry['method']:<10} {entry['id_space']:>14,} {entry['rows']:>12,} "
            f"{format_bytes(entry['bytes_hashed']):>10} {format_bytes(entry['bytes_full']):>10} "
            f"{rate(entry['expected_collision_rate']):>10} {entry['eval_distinct_ids']:>9,} "
            f"{rate(entry['measured_collision_rate']):>7} "
            f"{rate(entry['expected_collision_rate_at_eval_ids']):>7}"
        )
    hashed = sum(entry["bytes_hashed"] for entry in report.values())
    full = sum(entry["bytes_full"] for entry in report.values())
    lines.append(f"total: {format_bytes(hashed)} hashed vs {format_bytes(full)} full tables ({full / max(1, hashed):,.0f}x smaller)")
    above = [name for name, entry in report.items() if entry["rows"] > entry["id_space"]]
    if above:  # allowed for hashed methods: fewer collisions, more bytes than a full table
        lines.append(f"rows above the ID space (fewer collisions, more bytes): {', '.join(above)}")
    return "\n".join(lines)


def format_budget(
    choice: BudgetChoice, groups: list[FeatureGroupSpec], embedding_optimizer: str
) -> str:
    """What a hashing budget bought, from the built features: one line per budgeted feature
    (method, where its traffic model came from, own and hashed rows, the share of its lookups
    that read own rows, expected collisions over the declared ID space as the hashing report
    gives them, bytes as the report counts them), then the budget, the bytes used and the
    pinned features' bytes."""
    state_values = OPTIMIZER_STATE_VALUES_PER_ROW[embedding_optimizer]
    features = {f.name: (f, g.embedding_dim) for g in groups for f in g.features}
    shares = choice.allocation.shares
    if all(share.full for share in shares.values()):
        rule = "it holds the whole ID space of each"
    else:
        rule = (f"IDs above {choice.allocation.threshold:.3g} lookups per sample get rows of "
                f"their own, or hashed rows where the IDs are not known")
    lines = [f"hashing budget {choice.key}: {len(shares)} features sized by traffic ({rule})"]
    header = (
        f"{'feature':<20} {'method':<10} {'traffic from':<15} {'id space':>14} {'own rows':>10} "
        f"{'hashed rows':>13} {'own traffic':>11} {'exp. coll.':>10} {'bytes':>15}"
    )
    lines += [header, "-" * len(header)]
    used = 0
    for name, share in shares.items():
        feature, dim = features[name]
        size = feature_bytes(feature, dim, state_values)
        used += size
        own = feature.hashing.frequent_ids.numel() if feature.hashing.method == "frequency" else 0
        lines.append(
            f"{name:<20} {feature.hashing.method:<10} {share.feature.traffic.source:<15} "
            f"{feature.id_space:>14,} {own:>10,} {feature.num_embeddings - own:>13,} "
            f"{100 * share.own_traffic / share.feature.traffic.total:>10.1f}% "
            f"{100 * feature_expected_collision_rate(feature):>9.2f}% {size:>15,}"
        )
    fixed = sum(
        feature_bytes(feature, dim, state_values)
        for name, (feature, dim) in features.items() if name not in shares
    )
    lines.append(
        f"budget {choice.budget_bytes:,} B ({format_bytes(choice.budget_bytes)}), used "
        f"{used + fixed:,} B, fixed {fixed:,} B ({len(features) - len(shares)} pinned features)"
    )
    return "\n".join(lines)
