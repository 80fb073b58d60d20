"""Pre-emption under submitit, in-process: hashrec's stop signal reaches the handler it replaced
(submitit's, which requeues) only after training has stopped, and a requeued sweep point
resumes. tests/test_slurm.py runs the whole path on a real Slurm (``pytest -k preempt``)."""

from __future__ import annotations

import os
import signal

from hydra_plugins.hashrec_launcher.resuming_launcher import with_resume
from train.checkpoint_policy import CheckpointPolicy


def policy(said: list[str]) -> CheckpointPolicy:
    # signals() and hand_on_signals() use none of the model, optimizer or config.
    return CheckpointPolicy(None, None, None, None, total_steps=10, say=said.append)


def test_stop_signal_reaches_the_replaced_handler_only_when_handed_on():
    received: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, _frame: received.append(signum))
    said: list[str] = []
    checkpoints = policy(said)
    try:
        with checkpoints.signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert checkpoints.signal_received == signal.SIGUSR2
        assert received == []  # during training the signal is only a stop request
        checkpoints.last_saved_step = 7
        checkpoints.hand_on_signals()
        assert received == [signal.SIGUSR2]
        assert len(said) == 1 and said[0].startswith("checkpoint of step 7 saved; handing SIGUSR2")
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_default_action_is_not_replayed():
    # No Python handler before (plain srun or torchrun): nothing to hand on, and the process
    # must not die of the signal's default action.
    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    said: list[str] = []
    checkpoints = policy(said)
    try:
        with checkpoints.signals():
            os.kill(os.getpid(), signal.SIGUSR2)
        checkpoints.hand_on_signals()
        assert said == [] and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_requeued_sweep_point_resumes_from_its_checkpoint():
    assert with_resume(["trainer.seed=1"]) == ["trainer.seed=1", "trainer.resume=auto"]
    assert with_resume(["trainer.resume=none", "++trainer.resume=/x", "trainer.seed=1"]) == [
        "trainer.seed=1", "trainer.resume=auto",
    ]
