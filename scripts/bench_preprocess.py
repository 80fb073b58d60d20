"""Rows/s of Criteo preprocessing as one plain file grows: flat if the work is linear in its size.

    python scripts/bench_preprocess.py [--sizes-gb 0.25,0.5,1,2] [--workers 2] [--task-bytes N]

For each size, writes a synthetic file in Criteo's raw format (label, 13 integers, 26 hex
categoricals; a block of random lines repeated) to a temporary folder, preprocesses it as
scripts/preprocess_criteo.py would, prints one JSON line, and deletes both before the next
size. Only the preprocessing is timed: wall-clock rows/s, and rows per CPU second of this process
and its workers together, which other jobs on a shared machine disturb much less. Needs free
disk of about twice the largest size under --dir (default: the system's temporary folder).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.criteo import NUM_CATEGORICAL, NUM_DENSE  # noqa: E402
from modules.criteo_preprocess import preprocess  # noqa: E402


def synthetic_block(num_lines: int, seed: int = 0) -> bytes:
    """``num_lines`` raw Criteo lines with some missing values, as in the real logs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        dense = ["" if rng.random() < 0.2 else str(rng.randint(-2, 5000))
                 for _ in range(NUM_DENSE)]
        categorical = ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}"
                       for _ in range(NUM_CATEGORICAL)]
        lines.append("\t".join([str(rng.randint(0, 1)), *dense, *categorical]) + "\n")
    return "".join(lines).encode()


def write_file(path: Path, size_bytes: int, block: bytes) -> None:
    """At least ``size_bytes`` of whole lines: ``block`` repeated."""
    with open(path, "wb") as handle:
        for _ in range(-(-size_bytes // len(block))):
            handle.write(block)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="0.25,0.5,1,2",
                        help="comma-separated file sizes in GB (1e9 bytes)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task-bytes", type=int, default=64 << 20)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = parser.parse_args()
    block = synthetic_block(20_000)
    for size_gb in (float(text) for text in args.sizes_gb.split(",")):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            raw = Path(tmp) / "day_0"
            write_file(raw, int(size_gb * 1e9), block)
            started, started_cpu = time.perf_counter(), cpu_seconds()
            # preprocess joins its worker pool before returning, so their CPU time is counted.
            manifest = preprocess([raw], Path(tmp) / "out", workers=args.workers,
                                  task_bytes=args.task_bytes, progress=False)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - started_cpu
        print(json.dumps({"size_gb": size_gb, "task_bytes": args.task_bytes,
                          "workers": args.workers, "rows": manifest.rows,
                          "seconds": round(seconds, 1),
                          "rows_per_sec": round(manifest.rows / seconds),
                          "rows_per_cpu_sec": round(manifest.rows / cpu)}), flush=True)


if __name__ == "__main__":
    main()
