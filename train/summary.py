"""summary.json and the console summary table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON and W&B both choke on them); keys become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically (temp file + rename): readers never see half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(summary), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    rows = [
        ("world size", summary["world_size"]),
        ("steps", summary["steps"]),
        ("samples", summary["samples"]),
        ("samples/s (global)", summary["samples_per_sec"]),
        ("train loss", summary["train_loss"]),
        ("eval AUC", summary["eval_auc"]),
        ("eval Bayes AUC", summary["eval_bayes_auc"]),
        ("eval NE", summary["eval_ne"]),
        ("eval log loss", summary["eval_log_loss"]),
        ("embedding bytes", summary["embedding_bytes"]),
        ("peak RSS bytes (max rank)", summary["peak_rss_bytes"]),
        ("state digest", summary["state_digest"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["summary", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {fmt(value)}" for name, value in rows]
    return "\n".join(lines)
