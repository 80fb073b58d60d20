"""trainer.profile=true: a torch.profiler trace of a few training steps on every rank.

Each rank records the steps ``trainer.profile_steps = [first, count]`` (global steps, the same
on every rank) with CPU activities, CUDA ones on a GPU, tensor shapes and memory, and writes
``<run dir>/profile/rank_<r>.pt.trace.json``: a Chrome trace that Perfetto
(ui.perfetto.dev) opens as it is, and TensorBoard's profiler plugin reads from
``tensorboard --logdir <run dir>/profile`` (it looks for ``*.pt.trace.json``). Once every rank
has written its file, rank 0 logs the folder to W&B as an artifact of type ``profile``.
``scripts/plot_profile.py`` draws where a profiled step's time goes.

Off (the default), no hook is built and no profiler exists: the loop's only trace of this
feature is a flag read per step (``train.loop.step_range``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from train.loop import TrainingHook

PROFILE_DIR = "profile"


def trace_path(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its trace."""
    return Path(run_dir) / PROFILE_DIR / f"rank_{rank}.pt.trace.json"


class StepProfiler(TrainingHook):
    """Starts a profiler before global step ``first`` and stops it after step
    ``first + count - 1``; every rank writes its trace, then (a barrier) rank 0 logs the folder
    through ``log_folder``. A run that resumes past ``first`` records nothing (and says so); one
    that ends inside the window writes what it recorded."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        device: torch.device,
        first: int,
        count: int,
        log_folder=None,
        say=print,
    ) -> None:
        self.path = trace_path(run_dir, rank)
        self.rank = rank
        self.device = device
        self.first = first
        self.stop_after = first + count
        self.log_folder = log_folder
        self.say = say
        self.profiler: profile | None = None

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def _stop(self) -> None:
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        # On CUDA, stopping collects the GPU's activity records and may wait for queued work:
        # a host sync, once per run, after the profiled steps.
        profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.path))

    def before_training(self, start_step: int) -> None:
        if start_step == self.first:
            self._start()
        elif start_step > self.first:
            self.say(f"profile: the run starts at step {start_step}, after trainer.profile_steps "
                     f"starts ({self.first}): nothing is profiled")

    def after_step(self, step: int) -> bool:
        # ``step`` steps are done: the next one to run is global step ``step``.
        if step == self.first and self.profiler is None:
            self._start()
        elif step == self.stop_after and self.profiler is not None:
            self._stop()
            # Every rank stops at this step (a collective is allowed here): rank 0 logs the
            # folder once every rank's file is complete.
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
            self.say(f"profile: steps {self.first}..{self.stop_after - 1} -> "
                     f"{self.path.parent}/rank_<r>.pt.trace.json")
            if self.rank == 0 and self.log_folder is not None:
                self.log_folder(self.path.parent)
        return False

    def after_training(self) -> None:
        """Training ended (or failed) inside the window: keep what was recorded."""
        self._stop()


def wandb_folder_logger(metrics, first: int, count: int):
    """A function that logs a profile folder to rank 0's W&B run as an artifact (type
    ``profile``), or None without W&B. A failure there warns once and training goes on."""
    wandb_run = getattr(metrics, "wandb", None)
    if wandb_run is None:
        return None

    def log_folder(folder: Path) -> None:
        run = wandb_run.run
        if run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(
                f"profile-{run.id}",
                type="profile",
                description="torch.profiler Chrome traces, one per rank",
                metadata={"profile_steps": [first, count]},
            )
            artifact.add_dir(str(folder))
            run.log_artifact(artifact)
        except Exception as error:  # noqa: BLE001 -- logging must never stop training
            print(f"hashrec: warning: could not log the profile to W&B ({error}); it is in "
                  f"{folder}", file=sys.stderr, flush=True)

    return log_folder


def profiling_hooks(trainer, run_dir: Path, context, metrics, say) -> list[TrainingHook]:
    """[StepProfiler] when ``trainer.profile`` (a TrainerConfig) is on, else none."""
    if not trainer.profile:
        return []
    first, count = trainer.profile_steps
    return [StepProfiler(
        run_dir, context.rank, context.device, first, count,
        log_folder=wandb_folder_logger(metrics, first, count), say=say,
    )]
