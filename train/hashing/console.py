"""The hashing report (train/hashing/report.py) as a console table."""

from __future__ import annotations

from typing import Any

from train.sharding import format_bytes


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
