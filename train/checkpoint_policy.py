"""When to checkpoint: every N steps, at the end, and when a pre-emption signal arrives.

SIGTERM (torchrun and Slurm stop ranks with it) and SIGUSR2 (the signal hashrec's sbatch
scripts ask Slurm for before the time limit) only set a flag. The ranks agree on it with one
all-reduce every ``signal_check_every`` steps, so they all save the same step and stop
together; a signal is never acted on by one rank alone, which would deadlock the others in
the next collective.

A handler that was in place before (submitit's, in a hydra-submitit-launcher sweep job) is
not lost: it gets the signal after the checkpoint is safe (``hand_on_signals``), so a
timed-out sweep point is requeued by submitit instead of being recorded as failed.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from train.checkpoint import save_checkpoint
from train.collectives import AnyRankVote
from train.config import CheckpointConfig
from train.id_range_checks import raise_if_ids_out_of_range
from train.loop import TrainingHook

# SIGINT is Ctrl-C: the first is a stop request like SIGTERM; a second one stops at once
# (KeyboardInterrupt, which train/__main__.py turns into one line and exit 130).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class CheckpointPolicy(TrainingHook):
    """The checkpointing and pre-emption hook of training (``after_step``)."""

    # Created at the first vote (every rank votes at the same steps).
    _stop_vote: AnyRankVote | None = None

    def __init__(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: CheckpointConfig,
        total_steps: int,
        say: Callable[[str], None],
        on_saved: Callable[[int, Path], None] | None = None,
    ) -> None:
        """``on_saved(step, path)``: called on every rank after each complete save (W&B
        artifacts, ``logger.log_checkpoints``)."""
        self.run_dir = run_dir
        self.on_saved = on_saved
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        self.say = say
        self.signal_received: int | None = None
        self.last_saved_step: int | None = None
        # For hand_on_signals(): the stop signals received, in order, and the handlers that
        # signals() replaced.
        self.signals_received: list[int] = []
        self.previous_handlers: dict[int, object] = {}

    # A repeat of a stop signal within this many seconds of the first is the same request
    # delivered twice (Slurm signals every process of a step, torchrun forwards it too).
    REPEAT_GRACE_S = 5.0
    _first_signal_at: tuple[float, int] | None = None
    _steps_done = 0

    def _stuck_since_first_signal(self, signum: int) -> bool:
        """A stop signal again, more than REPEAT_GRACE_S after the first, with no step done
        in between: the loop is not running, so the flag would never be read."""
        if self._first_signal_at is None or signum not in self.signals_received:
            return False
        at, steps = self._first_signal_at
        return steps == self._steps_done and time.monotonic() - at > self.REPEAT_GRACE_S

    def save(self, step: int) -> None:
        path = save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.config.keep)
        self.last_saved_step = step
        self.say(f"checkpoint: step {step} -> {path}")
        if self.on_saved is not None:
            self.on_saved(step, path)

    def after_step(self, step: int) -> bool:
        """Called by every rank after every step; True = stop training now.

        No host-device sync unless a checkpoint is saved (a save reads every shard anyway):
        the stop vote is a host-side AnyRankVote (train/collectives.py), acted on one vote after it was cast."""
        self._steps_done += 1
        every = self.config.every_steps
        if every and step % every == 0 and step < self.total_steps:
            self._save_checked(step)
        # At the last step the job is about to end by itself (evaluate, save, summarise): a stop
        # signal there simply lets it end, rather than leaving a finished run without a summary.
        if (
            step < self.total_steps
            and step % self.config.signal_check_every == 0
            and self._vote_to_stop()
        ):
            if self.last_saved_step != step:
                self._save_checked(step)
            return True
        return False

    def _vote_to_stop(self) -> bool:
        if self._stop_vote is None:
            self._stop_vote = AnyRankVote()
        return self._stop_vote.vote(self.signal_received is not None)

    def _save_checked(self, step: int) -> None:
        """Save, unless some rank met an out-of-range ID since the last check: a checkpoint
        never holds steps trained on IDs that should have stopped the run (a collective)."""
        raise_if_ids_out_of_range(self.model)
        self.save(step)

    def at_end(self, step: int) -> None:
        if (self.config.at_end or self.config.every_steps) and self.last_saved_step != step:
            self.save(step)

    @contextmanager
    def signals(self) -> Iterator[None]:
        """Turn SIGTERM / SIGUSR2 / SIGINT into a stop request for the duration of training;
        a second SIGINT (Ctrl-C pressed again while the ranks have not yet stopped) raises
        KeyboardInterrupt: stop now, without saving."""

        def handler(signum: int, _frame) -> None:
            if signum == signal.SIGINT and signum in self.signals_received:
                raise KeyboardInterrupt("a second Ctrl-C")
            if self._stuck_since_first_signal(signum):
                # The job has not finished a step since the first one: it cannot act on the
                # flag (a stuck read, a hung collective). Stop now rather than swallow it.
                raise KeyboardInterrupt(
                    f"a second {signal.Signals(signum).name} and no step finished since the first"
                )
            if self.signal_received is None:
                self._first_signal_at = (time.monotonic(), self._steps_done)
            self.signal_received = signum
            if signum not in self.signals_received:
                self.signals_received.append(signum)

        replaced = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        # Python's own Ctrl-C handler is not handed on: it would raise KeyboardInterrupt after
        # the checkpoint is safe and turn a clean stop (143) into an interrupted one.
        self.previous_handlers = {
            sig: old for sig, old in replaced.items() if old is not signal.default_int_handler
        }
        try:
            yield
        finally:
            for sig, old in replaced.items():
                signal.signal(sig, old)

    def hand_on_signals(self) -> None:
        """Give each signal that stopped training to the Python handler signals() replaced.

        Call it once training has stopped and its checkpoint is complete. The handler then does
        what it would have done without hashrec, only later: submitit's (every sweep job runs
        under it) checkpoints the sweep point's submission, requeues the job from rank 0 and
        exits; on the other ranks it does nothing. Default actions (no Python handler: plain
        torchrun, srun, sbatch) are not replayed, as they would only kill a process that is
        about to exit with 143 anyway.
        """
        for signum in self.signals_received:
            previous = self.previous_handlers.get(signum)
            if callable(previous):
                name = getattr(previous, "__qualname__", repr(previous))
                self.say(
                    f"checkpoint of step {self.last_saved_step} saved; handing "
                    f"{signal.Signals(signum).name} on to {name}"
                )
                previous(signum, None)
