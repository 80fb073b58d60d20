"""Where metrics go: ``metrics.jsonl`` in the run directory, and W&B unless disabled.

Only rank 0 writes. Other ranks hold a logger whose methods do nothing: their figures reach
rank 0 through collectives in the loop (``train/step_stats.py``), never through files.

Keys carry a prefix: ``train/`` (loss, learning rates), ``eval/`` (AUC, NE, log loss, Bayes
AUC), ``perf/`` (samples/s, step-time split), ``mem/`` (RSS, CUDA, planned embedding bytes),
``hash/`` (hashing statistics). The step of every record is the global training step.

``metrics.jsonl`` holds one JSON object per line, so a run is readable without W&B:

    {"kind": "config", "config": {...}}                       once: the resolved config
    {"kind": "system", "system": {...}}                       once: world size, device, versions
    {"kind": "table", "key": "mem/sharding_plan", "step": 0, "columns": [...], "rows": [...]}
    {"kind": "checkpoint", "step": 500, "path": "..."}        with logger.log_checkpoints
    {"kind": "metrics", "step": 50, "time": 1.7e9, "train/loss": 0.61, ...}
    {"kind": "summary", "summary": {...}}                     once: what summary.json holds
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from train.config import Config, LoggerConfig
from train.distributed import DistributedContext
from train.sharding import PlacedTable
from train.system_info import system_facts
from train.summary import json_safe
from train.wandb_logger import WandbRun

METRICS_FILE = "metrics.jsonl"
PLAN_COLUMNS = ["table", "sharding_type", "ranks", "rows", "dim", "bytes", "bytes_per_rank"]


class MetricsLogger:
    """Rank 0's sink for metrics, tables, once-per-run facts and the final summary."""

    def __init__(
        self,
        config: LoggerConfig,
        run_dir: Path,
        is_main: bool,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.is_main = is_main
        self.run_dir = run_dir
        self.run_config = run_config or {}
        self.jsonl_path: Path | None = None
        self._jsonl = None
        self.wandb: WandbRun | None = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            self.jsonl_path = run_dir / METRICS_FILE
            # Append: a job restarted in the same run directory continues the same file.
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if run_config is not None:
            self._write({"kind": "config", "config": run_config})
        if config.mode != "disabled":
            self.wandb = WandbRun(config, run_dir, run_config or {})

    @property
    def wandb_dir(self) -> str | None:
        """The W&B run's own folder (holding ``run-<id>.wandb``), or None without W&B."""
        return self.wandb.directory if self.wandb is not None else None

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(json_safe(record)) + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars at global step ``step`` (call on every rank; only rank 0 writes)."""
        if not self.is_main or not metrics:
            return
        self._write({"kind": "metrics", "step": step, "time": time.time(), **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if not self.is_main:
            return
        self._write({"kind": "table", "key": key, "step": step, "columns": columns, "rows": rows})
        if self.wandb is not None:
            self.wandb.log_table(key, columns, rows, step=step)

    def log_run_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of the run itself (the sharding plan), kept by W&B across resumes
        (``WandbRun.log_run_table``); step 0 in metrics.jsonl."""
        if not self.is_main:
            return
        self._write({"kind": "table", "key": key, "step": 0, "columns": columns, "rows": rows})
        if self.wandb is not None:
            self.wandb.log_run_table(key, columns, rows)

    def log_checkpoint(self, step: int, path: Path) -> None:
        """A saved checkpoint: a JSONL line and a W&B ``checkpoint`` artifact whose metadata is
        the run's config (call on every rank after the save; only rank 0 writes)."""
        if not self.is_main:
            return
        self._write({"kind": "checkpoint", "step": step, "path": str(path)})
        if self.wandb is not None:
            self.wandb.log_checkpoint(step, path, {"config": self.run_config})

    def log_facts(self, kind: str, facts: dict[str, Any]) -> None:
        """Once-per-run facts (e.g. ``system``): a JSONL line and a W&B config entry, so runs
        can be filtered by them in the W&B UI."""
        if not self.is_main:
            return
        self._write({"kind": kind, kind: facts})
        if self.wandb is not None:
            self.wandb.update_config({kind: facts})

    def log_hashing(self, hashing: Any, step: int) -> None:
        """The hashing report (summary["hashing"]: feature -> method, rows, bytes saved,
        collision rates...) as the ``hash/memory`` table; nothing without a report (None).
        Its ``hash/<feature>/<field>`` scalars go with each eval (``hashing_metrics``)."""
        table = hashing_table(hashing)
        if table is not None:
            self.log_table("hash/memory", *table, step=step)

    def finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        """Write the final summary and close W&B and the JSONL (idempotent)."""
        if not self.is_main:
            return
        if summary is not None:
            self._write({"kind": "summary", "summary": summary})
        if self.wandb is not None:
            self.wandb.finish(summary, exit_code=exit_code)
            self.wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def plan_table(placed: list[PlacedTable]) -> tuple[list[str], list[list[Any]]]:
    """The sharding plan, one row per table: type, ranks, rows, dim, bytes (weights plus
    optimizer state, all ranks) and the bytes on each rank."""
    rows = [
        [
            table.name,
            table.sharding_type,
            ",".join(str(rank) for rank in table.ranks),
            table.num_embeddings,
            table.embedding_dim,
            sum(table.bytes_per_rank.values()),
            json.dumps({str(rank): size for rank, size in sorted(table.bytes_per_rank.items())}),
        ]
        for table in placed
    ]
    return PLAN_COLUMNS, rows


def hashing_table(hashing: Any) -> tuple[list[str], list[list[Any]]] | None:
    """summary["hashing"] (feature -> {method, buckets, bytes saved, collision rate, ...}) as
    a table with one row per feature; None when there is no hashing report (yet)."""
    if not isinstance(hashing, dict) or not hashing:
        return None
    fields: list[str] = []
    for entry in hashing.values():
        if isinstance(entry, dict):
            fields += [key for key in entry if key not in fields]
    columns = ["feature", *fields]
    rows = []
    for feature, entry in hashing.items():
        entry = entry if isinstance(entry, dict) else {"value": entry}
        row: list[Any] = [feature]
        for key in fields:
            value = entry.get(key)
            is_scalar = value is None or isinstance(value, (int, float, str, bool))
            row.append(value if is_scalar else json.dumps(value))
        rows.append(row)
    return columns, rows


def hashing_metrics(hashing: Any) -> dict[str, float]:
    """Numeric fields of summary["hashing"] as ``hash/<feature>/<field>`` scalars."""
    if not isinstance(hashing, dict):
        return {}
    metrics: dict[str, float] = {}
    for feature, entry in hashing.items():
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"hash/{feature}/{key}"] = value
    return metrics


def start_run_logging(
    config: Config, context: DistributedContext, run_dir: Path, placed: list[PlacedTable]
) -> MetricsLogger:
    """Open rank 0's logger (a no-op one elsewhere) and log the once-per-run facts: the
    resolved config, world size / device / versions, and the sharding plan table."""
    metrics = MetricsLogger(
        config.logger, run_dir, context.is_main, run_config=dataclasses.asdict(config)
    )
    if context.is_main:
        metrics.log_facts(
            "system", system_facts(context.world_size, context.device, context.backend)
        )
        metrics.log_run_table("mem/sharding_plan", *plan_table(placed))
    return metrics
