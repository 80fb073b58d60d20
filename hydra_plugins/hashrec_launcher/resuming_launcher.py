"""Hydra's submitit Slurm launcher, with requeued sweep points resuming their own checkpoint.

When a sweep job is pre-empted or reaches its time limit, Slurm sends SIGUSR2; the ranks save
a checkpoint and stop, and submitit's handler (CheckpointPolicy.hand_on_signals hands it the
signal) asks the launcher's ``checkpoint()`` for the call to run again, then requeues the job.
The stock launcher repeats the point's call as it was, which would train it again from step 0;
this one adds ``trainer.resume=auto``, so the requeued point continues from the checkpoint in
its run directory (the sweep dir and ``hydra.job.num`` subdir are the same on every run).
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

RESUME_OVERRIDE = "trainer.resume=auto"


def with_resume(sweep_overrides: list[str]) -> list[str]:
    """The point's overrides with any trainer.resume replaced by trainer.resume=auto."""
    kept = [
        override for override in sweep_overrides
        if override.lstrip("+~").split("=", 1)[0] != "trainer.resume"
    ]
    return [*kept, RESUME_OVERRIDE]


class ResumingSlurmLauncher(SlurmLauncher):
    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The submission submitit requeues: this point again, resuming (see module doc)."""
        return super().checkpoint(with_resume(list(sweep_overrides)), *args, **kwargs)
