"""No thread of the job outlives it: the interpreter's teardown runs with nothing of ours left.

A Python thread that is still running when the interpreter exits is ended by CPython (< 3.14)
with ``pthread_exit`` once it asks for the GIL again. Inside torch's C++ (freeing a tensor
releases the GIL) that forced unwind meets a ``noexcept`` frame and libstdc++ aborts:
"terminate called without an active exception", status -6. The batch-prefetch thread of a
stopped job did that in 4 of 70 runs: its stream was closed only by the garbage collector
during that teardown. These tests check the cause, deterministically, not the rare abort.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import torch

from modules.prefetch import prefetched
from tests.helpers import REPO, TINY


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def endless_tensors():
    while True:
        yield torch.randn(64, 8)


def test_closing_a_prefetched_stream_ends_its_thread():
    before = prefetch_threads()
    stream = prefetched(endless_tensors(), depth=2)
    next(stream)
    assert len(prefetch_threads()) == len(before) + 1
    stream.close()
    assert prefetch_threads() == before


def test_closing_a_stream_whose_source_ended_with_a_full_queue_does_not_hang():
    """The source is done while the queue is full: the thread waits to queue its end mark,
    and must see the stop rather than wait for room for ever."""
    before = prefetch_threads()
    stream = prefetched(iter([torch.zeros(1)] * 4), depth=1)
    next(stream)
    time.sleep(0.3)  # the thread fills the queue and waits to put the next item
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 5
    assert prefetch_threads() == before


# A job stopped after its checkpoint (as by SIGTERM or Ctrl-C: the stop vote is made to pass
# at its first check), run in a process of its own; while Stopped is still held (its traceback
# keeps the training frames alive), which Python threads are left?
STOPPED_JOB = """
import json, sys, threading
from train.checkpoint_policy import CheckpointPolicy
from train.compose import compose_config
from train.run import Stopped, run

CheckpointPolicy._vote_to_stop = lambda self: True
try:
    run(compose_config(sys.argv[2:]), sys.argv[1])
    print(json.dumps({"stopped": False}))
except Stopped:
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print(json.dumps({"stopped": True, "threads": alive}))
"""


def test_a_stopped_job_leaves_no_thread_running(tmp_path):
    args = [*TINY, "trainer.steps=100000", "trainer.eval_every=0",
            "checkpoint.signal_check_every=2", "trainer.cpu_affinity=none"]
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_JOB, str(tmp_path / "run"), *args], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"stopped": True, "threads": []}
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").exists()
