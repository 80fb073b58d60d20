"""Ctrl-C (SIGINT): the first is a stop request (save, exit 143), a second one stops now
(exit 130); outside training it ends the job at once. Always one line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, TINY

BASE = [*TINY, "logger.mode=disabled", "trainer.eval_every=0", "logger.log_every=1",
        "trainer.steps=100000"]

# python -m train, with the data phase replaced by one that says so and then waits: a Ctrl-C
# that lands outside training at a known moment.
SLOW_DATA = """
import runpy, sys, time
import train.run

def slow_data(*args, **kwargs):
    print("loading data", flush=True)
    time.sleep(120)

train.run._data = slow_data
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


def start(args: list[str], cwd: Path, code: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "train", *args]
    return subprocess.Popen(
        command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}: {process.communicate()[1][-2000:]}")


def last_line_clean(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def test_ctrl_c_saves_a_checkpoint_and_stops_like_sigterm(tmp_path):
    process = start([*BASE, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    wait_for(process, "step")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    line = last_line_clean(stderr)
    assert line.startswith("hashrec: stopped by signal at step "), stderr[-2000:]
    step = int(line.split("at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "meta.json").exists()


def test_a_second_ctrl_c_stops_now(tmp_path):
    # The ranks vote on a stop only every 10^6 steps: the first Ctrl-C is still pending when the
    # second arrives.
    process = start([*BASE, "checkpoint.signal_check_every=1000000",
                     f"hydra.run.dir={tmp_path}/run"], tmp_path)
    wait_for(process, "step")
    process.send_signal(signal.SIGINT)
    wait_for(process, "step")  # the first one did not stop training
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert last_line_clean(stderr) == "hashrec: interrupted (a second Ctrl-C): stopped now without saving"
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").glob("step_*[0-9]")
    )


def test_ctrl_c_outside_training_is_one_line(tmp_path):
    process = start([*BASE, f"hydra.run.dir={tmp_path}/run"], tmp_path, code=SLOW_DATA)
    wait_for(process, "loading data")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert last_line_clean(stderr) == "hashrec: interrupted"


def test_ctrl_c_while_importing_torch_is_one_line(tmp_path):
    """Ctrl-C in the seconds the imports take: one line and 130, no traceback from inside
    torch. The signal is sent once libtorch is mapped into the process (it is importing
    torch), well before training could start."""
    process = start([*BASE, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    maps = Path(f"/proc/{process.pid}/maps")
    while process.poll() is None and "libtorch_cpu" not in maps.read_text():
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert last_line_clean(stderr) == "hashrec: interrupted"
    assert stdout == "" and not (tmp_path / "run").exists()
