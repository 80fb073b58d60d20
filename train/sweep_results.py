"""A sweep's results table, written when the sweep ends: a Hydra callback (conf/config.yaml,
``hydra.callbacks.sweep_results``).

``python -m train -m ...`` writes ``<sweep dir>/results.csv`` with one row per point: its job
number, status (``completed``; ``failed``: it started but left no summary.json; ``not_run``),
folder, overrides (all of them in one column, and one column per overridden key) and the
figures of its ``summary.json``. With W&B on (``logger.mode``), the same table goes to a small
W&B run of job_type ``sweep`` (``sweep/results``), its files under ``<sweep dir>/wandb``.

The points are the basic sweeper's expansion of the sweep's overrides (hydra.job.num order),
so a point that never ran still has its row. Their folders are found by the ``.hydra`` files
each job writes (``hydra.job.num`` in its hydra.yaml), else as ``<sweep dir>/<num>`` (the
default ``hydra.sweep.subdir``). This works for any launcher whose jobs write into the sweep
directory: the basic one runs them in this process, the submitit one on Slurm nodes, and both
call ``on_multirun_end`` here once the jobs are done.

Hydra skips ``on_multirun_end`` when a point fails (the failure ends the sweep):
``write_unfinished_sweep_results``, called by ``train/__main__.py`` on its way out, writes the
table then, so the failed point and those after it appear with their status.

This module is imported by every ``python -m train`` (Hydra instantiates callbacks in single
runs too), before torch: it imports no torch and does nothing until a multirun starts.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS_FILE = "results.csv"
# summary.json keys copied into the table, in this order (nested ones are summarised below).
SUMMARY_FIELDS = (
    "world_size", "steps", "samples", "samples_per_sec", "train_loss", "eval_auc",
    "eval_bayes_auc", "eval_ne", "eval_log_loss", "embedding_bytes", "peak_rss_bytes",
    "skipped_rows", "wall_seconds", "state_digest",
)
# From the hashing report: bytes of every table as hashed (parameters, optimizer state and a
# managed table's map) and each feature's measured collision rate on the eval window.
HASHED_BYTES = "embedding_bytes_hashed"
COLLISION_PREFIX = "collision_rate/"
FIXED_COLUMNS = ("job_num", "status", "dir", "overrides")

# The sweep under way in this process (set by on_multirun_start, cleared once written).
_unfinished: "SweepResults | None" = None


def expected_points(task_overrides: list[str]) -> list[list[str]]:
    """Each point's overrides, in job-number order, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return BasicSweeper.split_arguments(parsed, None)[0]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def point_dirs(sweep_dir: Path) -> dict[int, Path]:
    """job number -> the folder that job wrote its .hydra files into."""
    found: dict[int, Path] = {}
    for hydra_file in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        hydra = (_read_yaml(hydra_file) or {}).get("hydra") or {}
        number = (hydra.get("job") or {}).get("num")
        if isinstance(number, int):
            found[number] = hydra_file.parent.parent
    return found


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from one summary.json."""
    figures = {key: summary.get(key) for key in SUMMARY_FIELDS}
    hashing = summary.get("hashing")
    if isinstance(hashing, dict) and hashing:
        entries = [entry for entry in hashing.values() if isinstance(entry, dict)]
        if all("bytes_hashed" in entry for entry in entries):
            figures[HASHED_BYTES] = sum(entry["bytes_hashed"] for entry in entries)
        for feature, entry in hashing.items():
            if isinstance(entry, dict) and "measured_collision_rate" in entry:
                figures[f"{COLLISION_PREFIX}{feature}"] = entry["measured_collision_rate"]
    return figures


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def collect_rows(
    sweep_dir: Path, points: list[list[str]], errors: dict[int, str] | None = None
) -> list[dict[str, Any]]:
    """One row per point: expected ones first (by job number), then any other job folder
    found in the sweep directory (a sweeper this module cannot expand)."""
    dirs = point_dirs(sweep_dir)
    numbers = sorted(set(range(len(points))) | set(dirs))
    rows = []
    for number in numbers:
        folder = dirs.get(number)
        if folder is None and (sweep_dir / str(number)).is_dir():
            folder = sweep_dir / str(number)  # started, failed before writing .hydra
        overrides = points[number] if number < len(points) else []
        written = _read_yaml(folder / ".hydra" / "overrides.yaml") if folder else None
        if isinstance(written, list):
            overrides = [str(item) for item in written]
        row: dict[str, Any] = {
            "job_num": number,
            "dir": str(folder.relative_to(sweep_dir)) if folder else "",
            "overrides": " ".join(overrides),
        }
        row.update({_key(item): item.split("=", 1)[1] if "=" in item else "" for item in overrides})
        summary_path = folder / "summary.json" if folder else None
        if summary_path is not None and summary_path.exists():
            row["status"] = "completed"
            row.update(summary_figures(json.loads(summary_path.read_text())))
        else:
            row["status"] = "failed" if folder is not None else "not_run"
        if errors and number in errors:
            row["error"] = errors[number]
        rows.append(row)
    return rows


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Fixed columns, then override keys, then figures, each group in first-seen order."""
    columns = list(FIXED_COLUMNS)
    figures = [*SUMMARY_FIELDS, HASHED_BYTES]
    seen_figures: list[str] = []
    for row in rows:
        for key in row:
            if key in columns or key in seen_figures:
                continue
            if key in figures or key.startswith(COLLISION_PREFIX) or key == "error":
                seen_figures.append(key)
            else:
                columns.append(key)
    ordered = [key for key in figures if key in seen_figures]
    ordered += [key for key in seen_figures if key not in ordered]
    return columns + ordered


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Atomically (temp file + rename): a reader never sees half a table."""
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    os.replace(temporary, path)


def log_wandb_table(
    sweep_dir: Path, columns: list[str], rows: list[dict[str, Any]], wandb_settings: dict
) -> None:
    """The table as ``sweep/results`` of a W&B run of job_type ``sweep``; a W&B failure is a
    warning (the CSV is written already)."""
    mode = wandb_settings.get("mode", "disabled")
    if mode == "disabled":
        return
    if mode == "offline":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no network offline
    try:
        import wandb

        run = wandb.init(
            mode=mode,
            dir=str(sweep_dir),
            project=wandb_settings.get("project"),
            entity=wandb_settings.get("entity"),
            group=wandb_settings.get("group"),
            job_type="sweep",
            name=f"sweep {sweep_dir.name}",
            config={"sweep_dir": str(sweep_dir)},
            settings=wandb.Settings(
                x_disable_stats=True, x_disable_machine_info=mode != "online", quiet=True
            ),
        )
        data = [[row.get(column) for column in columns] for row in rows]
        run.log({"sweep/results": wandb.Table(columns=columns, data=data)})
        run.finish()
    except Exception as error:  # noqa: BLE001 -- the CSV is the record; W&B is a copy
        print(f"hashrec: warning: the sweep table was not logged to W&B ({error})",
              file=sys.stderr, flush=True)


class SweepResults(Callback):
    """Writes ``<sweep dir>/results.csv`` (and the W&B table) when a multirun ends."""

    def __init__(self, wandb_mode: str = "disabled", project: str | None = None,
                 entity: str | None = None, group: str | None = None) -> None:
        self.wandb_settings = {"mode": wandb_mode, "project": project, "entity": entity,
                               "group": group}
        self.sweep_dir: Path | None = None
        self.points: list[list[str]] = []
        self.errors: dict[int, str] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _unfinished
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            self.points = expected_points(list(config.hydra.overrides.task))
        except Exception:  # noqa: BLE001 -- a sweeper syntax the basic one lacks: scan only
            self.points = []
        _unfinished = self

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """In this process (basic launcher): keep a failed job's error for its row."""
        from hydra.core.utils import JobStatus

        if getattr(job_return, "status", None) == JobStatus.FAILED:
            number = config.hydra.job.num
            # The public return_value re-raises a failed job's exception; this is its value.
            error = job_return._return_value
            first_line = str(error).splitlines()[0] if str(error) else ""
            self.errors[number] = f"{type(error).__name__}: {first_line}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write()

    def write(self) -> Path | None:
        """Write the table (once); returns its path."""
        global _unfinished
        if _unfinished is self:
            _unfinished = None
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return None
        rows = collect_rows(self.sweep_dir, self.points, self.errors)
        columns = table_columns(rows)
        path = self.sweep_dir / RESULTS_FILE
        write_csv(path, columns, rows)
        statuses = [row["status"] for row in rows]
        counts = ", ".join(
            f"{statuses.count(status)} {status.replace('_', ' ')}"
            for status in ("completed", "failed", "not_run") if status in statuses
        )
        print(f"sweep results: {path} ({len(rows)} points: {counts})", flush=True)
        log_wandb_table(self.sweep_dir, columns, rows, self.wandb_settings)
        return path


def write_unfinished_sweep_results() -> None:
    """A sweep that a failed point ended (Hydra then skips on_multirun_end) still writes its
    table; nothing when no sweep is under way or its table is written."""
    if _unfinished is not None:
        _unfinished.write()
