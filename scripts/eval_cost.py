"""What the eval figures cost at scale: time and peak memory of the exact AUC (and the rest
of click_metrics) over N samples, and of scoring 2 ranks' eval samples.

    python scripts/eval_cost.py [--samples 10000000] [--repeats 3]

One process: ``auc`` and ``click_metrics`` over N float32 logits and 0/1 labels. Two gloo
ranks of N / 2 samples each (one intra-op thread each, as on a 2-core host): the job's
``eval_scores`` (rank 0 gathers and scores, the others receive the figures) against scoring on
every rank (every rank gathers every sample with ``gather_concat`` and scores them all).

Each measurement runs in fresh processes. Peak memory is the rise of a process's resident set
(VmHWM, reset through /proc/self/clear_refs before each repeat) over what it held before: the
scoring's own memory, without the inputs. Prints one JSON line per measurement (per rank for
2 ranks): the median time of ``--repeats`` and the largest rise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.threads import limit_openmp_spinning  # noqa: E402

limit_openmp_spinning()  # as the job runs (before torch loads OpenMP)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from modules.metrics import auc, click_metrics  # noqa: E402
from train.collectives import barrier, gather_concat, on_rank_zero  # noqa: E402
from train.loop import eval_scores  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(work: Callable[[], object], repeats: int) -> dict:
    """Median seconds (wall and this process's CPU) of ``work`` and the largest rise of the
    resident set it caused."""
    seconds, cpu_seconds, rises = [], [], []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        started, cpu_started = time.perf_counter(), time.process_time()
        work()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        rises.append(_status_kib("VmHWM") - before)
    return {"seconds": round(statistics.median(seconds), 3),
            "seconds_all": [round(s, 3) for s in seconds],
            "cpu_seconds": round(statistics.median(cpu_seconds), 3),
            "peak_rise_mib": round(max(rises) / 1024, 1)}


def samples(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, generator=generator)
    labels = (torch.rand(count, generator=generator) < 0.25).float()
    return logits, labels


def scored_on_every_rank(logits: torch.Tensor, labels: torch.Tensor):
    """Every rank gathers every sample and scores them all."""
    all_logits = gather_concat(logits).cpu()
    all_labels = gather_concat(labels).cpu()
    real = all_labels >= 0
    return click_metrics(all_logits[real], all_labels[real])


SCORERS = {"rank 0 scores": eval_scores, "every rank scores": scored_on_every_rank}


def _two_ranks(rank: int, port: int, name: str, per_rank: int, repeats: int, out: str):
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    logits, labels = samples(per_rank, seed=rank)
    on_rank_zero(lambda: None)  # its group exists from the job's start-up on

    def work() -> None:
        SCORERS[name](logits, labels)
        barrier()  # the phase ends when every rank has the figures

    Path(f"{out}.{rank}").write_text(json.dumps(measure(work, repeats)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_process(name: str, count: int, repeats: int) -> None:
    logits, labels = samples(count, seed=0)
    work = {"auc": lambda: auc(logits, labels), "click_metrics": lambda: click_metrics(logits, labels)}[name]
    print(json.dumps({"measure": name, "processes": 1, "samples": count,
                      "threads": torch.get_num_threads(), **measure(work, repeats)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = parser.parse_args()
    if args.one:
        _one_process(args.one, args.samples, args.repeats)
        return
    # Each measurement in fresh processes: a heap grown by one would lower the next one's peak.
    for name in ("auc", "click_metrics"):
        subprocess.run([sys.executable, __file__, "--one", name, "--samples", str(args.samples),
                        "--repeats", str(args.repeats)], check=True)
    out = f"/tmp/eval_cost_{os.getpid()}"
    for name in SCORERS:
        mp.start_processes(
            _two_ranks, args=(_free_port(), name, args.samples // 2, args.repeats, out),
            nprocs=2, start_method="spawn",
        )
        for rank in range(2):
            figures = json.loads(Path(f"{out}.{rank}").read_text())
            print(json.dumps({"measure": name, "processes": 2, "rank": rank,
                              "samples": args.samples, "threads": 1, **figures}), flush=True)
            os.remove(f"{out}.{rank}")


if __name__ == "__main__":
    main()
