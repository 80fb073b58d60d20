"""Run ``python -m train <overrides>`` on a GPU with CUDA's sync debugging on, and count the
host-device synchronisations by where they happen. Needs CUDA.

    python scripts/count_cuda_syncs.py trainer.steps=200 logger.log_every=100

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``.item()``,
``.tolist()``, a blocking copy to the host, ...) raise a warning. Each warning is attributed to
the phase its stack is in: a logging step's report (``Trainer._report``), an evaluation, a
checkpoint or other work between steps, or the training step itself (everything under
``pipeline.progress``). The training step should have none of its own; TorchRec's input
distribution reads its all-to-all split sizes on purpose, so those are listed by site. The
counts print as one JSON line at exit.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# (file, function) of the loop's frames that mark a phase, checked in this order.
PHASES = ((("train/loop.py", "_report"), "logging step"),
          (("train/loop.py", "evaluate"), "evaluation"),
          (("train/loop.py", "_after_step"), "between steps"),
          (("train/loop.py", "_run_segment"), "training step"))

counts: Counter = Counter()
sites: Counter = Counter()


def record(message, category, filename, lineno, file=None, line=None) -> None:
    if "synchronizing" not in str(message):
        return
    frames = traceback.extract_stack()[:-1]
    seen = {(frame.filename, frame.name) for frame in frames}
    phase = next(
        (label for (path, name), label in PHASES
         if any(filename.endswith(path) and function == name for filename, function in seen)),
        "set-up and summary",
    )
    counts[phase] += 1
    if phase == "training step":
        # The innermost frame of hashrec's or TorchRec's code: who asked for the sync.
        for frame in reversed(frames):
            owner = ("hashrec" if frame.filename.startswith(str(REPO))
                     else "torchrec" if "/torchrec/" in frame.filename else None)
            if owner:
                sites[f"{owner} {Path(frame.filename).name}:{frame.lineno} {frame.name}"] += 1
                break


def report() -> None:
    print(json.dumps({"syncs_by_phase": dict(counts), "training_step_sites": dict(sites)}),
          flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("count_cuda_syncs: needs a CUDA device")
    sys.path.insert(0, str(REPO))
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    atexit.register(report)
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
