"""The W&B run of a job, on rank 0 only. Logging must never stop training.

``wandb`` is imported here, lazily, only when rank 0 opens a run with mode offline or online.
Every call into W&B is guarded: the first failure (no network, bad key, a W&B error) prints
one warning, the run falls back to offline files under the run directory (syncable later with
``wandb sync``), and training goes on; if even offline fails, W&B is dropped and the local
JSONL (see ``train/metrics_logger.py``) still has every figure.

Run ids: a job keeps its W&B run id in ``<run dir>/wandb/hashrec_run_id``; a job started
again in the same run directory (a requeued Slurm job, a resumed torchrun job) reads it and
continues the same W&B run (``resume="allow"``). ``logger.run_id`` forces an id.

What a W&B user gets (docs/logging.md has the full list):

- every key is charted against ``train/global_step`` (``define_metric``), and the run table
  can sort runs by ``eval/auc`` (max and last), ``eval/ne`` and ``eval/log_loss`` (min and
  last), as W&B keeps those summaries from the whole history;
- ``job_type`` ``train``, ``plan`` (plan_only) or ``sweep_point`` (a Hydra multirun job), and
  the run's ``notes`` from ``logger.notes``;
- once-per-run tables (the sharding plan) that survive a resume: W&B keeps only steps above
  the last it has for a run, so a continued run puts them in the run summary, which no step
  bounds, instead of at step 0;
- with ``logger.log_checkpoints=true``, each saved checkpoint as a ``checkpoint`` artifact,
  and ``log_exported_model`` for the exported model (a ``model`` artifact).
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
# The x axis of every chart: the global training step, logged with every record.
STEP_KEY = "train/global_step"
# Summaries W&B keeps for a key over the whole history (default: the last value), so the
# runs table sorts by the best eval, not by whatever the last report happened to be.
METRIC_SUMMARIES = {
    "eval/auc": "max,last",
    "eval/ne": "min,last",
    "eval/log_loss": "min,last",
    "train/loss": "min,last",
    "train/auc": "max,last",
    "train/ne": "min,last",
}


def _warn(message: str) -> None:
    print(f"hashrec: warning: {message}", file=sys.stderr, flush=True)


def in_multirun() -> bool:
    """True in a job of a Hydra multirun (a sweep point): Hydra's run mode says so; a job
    started by hydra-submitit-launcher without Hydra's config set has submitit's variable."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return True
    except Exception:  # noqa: BLE001 -- no Hydra config: not a multirun as far as Hydra says
        pass
    return "SUBMITIT_EXECUTOR" in os.environ


def wandb_job_type(plan_only: bool, multirun: bool) -> str:
    """W&B's job_type, which groups runs in the UI: plan, sweep_point or train."""
    if plan_only:
        return "plan"
    return "sweep_point" if multirun else "train"


def new_run_id() -> str:
    """8 lowercase letters and digits, the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbRun:
    """One W&B run: ``log``, ``log_table``, ``log_run_table``, ``log_checkpoint``,
    ``log_model``, ``update_config``, ``finish``; never raises.

    ``job_type``: None = from the run config (``plan_only``) and the Hydra run mode."""

    def __init__(
        self,
        config: LoggerConfig,
        run_dir: Path,
        run_config: dict[str, Any],
        warn: Callable[[str], None] = _warn,
        job_type: str | None = None,
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
        self.job_type = job_type or wandb_job_type(
            bool(run_config.get("plan_only")), in_multirun()
        )
        # This session continues a W&B run an earlier one started (a resumed or requeued job,
        # or a forced id): its steps up to the last one W&B has are dropped there.
        self.continues_run = self.run_id is not None or self._saved_run_id() is not None
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
                job_type=self.job_type,
                notes=self.config.notes or None,
                settings=settings,
            )
            self.continues_run = self.continues_run or bool(getattr(self.run, "resumed", False))
            self._define_metrics(self.run)
            self.mode = mode
            (self.wandb_root / RUN_ID_FILE).write_text(self.run_id + "\n")
        except Exception as error:  # noqa: BLE001 -- any W&B failure must not stop training
            self.run = None
            self._fall_back(error)

    @staticmethod
    def _define_metrics(run: Any) -> None:
        """Every key against the global step, and the summaries of METRIC_SUMMARIES."""
        run.define_metric(STEP_KEY, hidden=True)
        run.define_metric("*", step_metric=STEP_KEY)
        for key, summary in METRIC_SUMMARIES.items():
            run.define_metric(key, step_metric=STEP_KEY, summary=summary)

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
        self._guarded(lambda run: run.log({**metrics, STEP_KEY: step}, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def action(run: Any) -> None:
            import wandb

            run.log({key: wandb.Table(columns=columns, data=rows), STEP_KEY: step}, step=step)

        self._guarded(action)

    def log_run_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table that belongs to the run, not to a step (the sharding plan): at step 0 in a
        new run; in the run summary when this session continues a run, as W&B would drop a
        step-0 row there (it keeps only steps above its last)."""
        if not self.continues_run:
            self.log_table(key, columns, rows, step=0)
            return

        def action(run: Any) -> None:
            import wandb

            run.summary[key] = wandb.Table(columns=columns, data=rows)

        self._guarded(action)

    def log_checkpoint(self, step: int, path: Path, metadata: dict[str, Any]) -> None:
        """Checkpoint folder ``path`` of ``step`` as version ``step-<step>`` (and ``latest``) of
        the run's ``checkpoint-<run id>`` artifact: a reference to the folder, not a copy (a
        checkpoint is as large as the tables), so W&B records where it is, its files and
        sizes; it must stay there (``checkpoint.keep`` prunes old ones) to be downloaded."""

        def action(run: Any) -> None:
            import wandb

            artifact = wandb.Artifact(
                f"checkpoint-{self.run_id}", type="checkpoint",
                metadata=json_safe({"step": step, **metadata}),
            )
            # checksum=False: W&B lists the files without reading them.
            artifact.add_reference(Path(path).resolve().as_uri(), checksum=False)
            run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

        self._guarded(action)

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        """An exported model file as the run's ``model-<run id>`` artifact (uploaded: it is
        what a W&B user downloads to serve)."""

        def action(run: Any) -> None:
            import wandb

            artifact = wandb.Artifact(
                f"model-{self.run_id}", type="model", metadata=json_safe(metadata)
            )
            artifact.add_file(str(path))
            run.log_artifact(artifact, aliases=["latest"])

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


def log_exported_model(
    config: LoggerConfig, run_dir: Path, model_path: Path, metadata: dict[str, Any]
) -> str | None:
    """The hook for the model export (``scripts/export.py``, written elsewhere): log the
    exported file as a ``model`` artifact of the W&B run trained in ``run_dir`` (the same run
    id, in a session of job_type ``export``), with ``metadata`` (precision, the training
    config, ...). Returns this session's W&B folder; None when W&B is off or failed."""
    if config.mode == "disabled":
        return None
    run = WandbRun(config, Path(run_dir), {}, job_type="export")
    run.log_model(Path(model_path), metadata)
    directory = run.directory
    run.finish(None)
    return directory
