"""The W&B run of a job, on rank 0 only. Logging must never stop training.

``wandb`` is imported here, lazily, only when rank 0 opens a run with mode offline or online.
Every call into W&B is guarded: the first failure (no network, bad key, a W&B error) prints
one warning, the run falls back to offline files under the run directory (syncable later with
``wandb sync``), and training goes on; if even offline fails, W&B is dropped and the local
JSONL (see ``train/metrics_logger.py``) still has every figure.

Run ids: a job keeps its W&B run id in ``<run dir>/wandb/hashrec_run_id``; a job started
again in the same run directory (a requeued Slurm job, a resumed torchrun job) reads it and
continues the same W&B run (``resume="allow"``). ``logger.run_id`` forces an id.
"""

from __future__ import annotations

import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Callable

from train.config import LoggerConfig
from train.summary import json_safe

RUN_ID_FILE = "hashrec_run_id"


def _warn(message: str) -> None:
    print(f"hashrec: warning: {message}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    """8 lowercase letters and digits, the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbRun:
    """One W&B run: ``log``, ``log_table``, ``update_config``, ``finish``; never raises."""

    def __init__(
        self,
        config: LoggerConfig,
        run_dir: Path,
        run_config: dict[str, Any],
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.run_config = run_config
        self.warn = warn
        self.mode = config.mode
        self.warned: set[str] = set()
        self.run: Any = None
        self.wandb_root = run_dir / "wandb"
        self.run_id = config.run_id
        self._start(self.mode)

    # -- start and fall back ------------------------------------------------------------

    def _saved_run_id(self) -> str | None:
        path = self.wandb_root / RUN_ID_FILE
        if not path.exists():
            return None
        return path.read_text().strip() or None

    def _start(self, mode: str) -> None:
        if mode == "offline":
            # Offline means no network: W&B's error reporting / telemetry would otherwise
            # post to its base URL from a background thread.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb

            self.wandb_root.mkdir(parents=True, exist_ok=True)
            self.run_id = self.run_id or self._saved_run_id()
            settings = wandb.Settings(
                # The system monitor looks up a W&B host even offline; keep it for online runs
                # (CPU/GPU utilisation charts) only.
                x_disable_stats=mode != "online" or not self.config.system_stats,
                x_disable_machine_info=mode != "online",
                init_timeout=self.config.init_timeout_s,
                # No run history / summary dump at exit: hashrec prints its own summary.
                quiet=True,
            )
            if self.run_id is None:
                self.run_id = new_run_id()
            self.run = wandb.init(
                mode=mode,
                dir=str(self.run_dir),
                project=self.config.project,
                entity=self.config.entity,
                group=self.config.group,
                tags=list(self.config.tags) or None,
                name=self.config.run_name,
                id=self.run_id,
                resume="allow",
                config=self.run_config,
                settings=settings,
            )
            self.mode = mode
            (self.wandb_root / RUN_ID_FILE).write_text(self.run_id + "\n")
        except Exception as error:  # noqa: BLE001 -- any W&B failure must not stop training
            self.run = None
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        """An online run continues offline; an offline run drops W&B. One warning for each
        (so one in all, unless offline fails too)."""
        broken, self.run = self.run, None
        if broken is not None:
            try:
                broken.finish(quiet=True)
            except Exception:  # noqa: BLE001
                pass
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.mode == "online":
            try:
                import wandb

                # The failed online run keeps its id registered in W&B's service process;
                # a fresh service lets the offline run reuse the id (so a later `wandb sync`
                # lands in the same W&B run).
                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass
            self._warn_once(
                "online",
                f"W&B online logging failed ({reason}); logging offline under "
                f"{self.wandb_root} instead (upload later with `wandb sync`); training goes on",
            )
            self.mode = "offline"
            self._start("offline")
        else:
            self._warn_once(
                "offline",
                f"W&B logging failed ({reason}); W&B is off for this run, metrics stay in "
                f"{self.run_dir / 'metrics.jsonl'}; training goes on",
            )
            self.mode = "disabled"

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            self.warn(message)

    def _guarded(self, action: Callable[[Any], None]) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:  # noqa: BLE001
            self._fall_back(error)
            if self.run is not None:  # retry once on the offline run
                try:
                    action(self.run)
                except Exception as second:  # noqa: BLE001
                    self._fall_back(second)

    # -- logging -----------------------------------------------------------------------

    @property
    def directory(self) -> str | None:
        """This run's own folder (``offline-run-*`` / ``run-*``), holding ``run-<id>.wandb``."""
        if self.run is None:
            return None
        try:
            return str(self.run.settings.sync_dir)
        except Exception:  # noqa: BLE001
            return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guarded(lambda run: run.log(metrics, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def action(run: Any) -> None:
            import wandb

            run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

        self._guarded(action)

    def update_config(self, values: dict[str, Any]) -> None:
        self._guarded(lambda run: run.config.update(json_safe(values), allow_val_change=True))

    def finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        if summary is not None:
            self._guarded(lambda run: run.summary.update(json_safe(summary)))
        directory, mode = self.directory, self.mode
        self._guarded(lambda run: run.finish(exit_code=exit_code))
        self.run = None
        if directory is not None and mode == "offline":
            print(f"W&B offline run: {directory}  (upload: wandb sync {directory})", flush=True)
