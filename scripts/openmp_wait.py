"""What one small parallel op costs under an OpenMP wait setting: the time per in-place add of
two 200,000-float tensors, on torch's intra-op threads.

    GOMP_SPINCOUNT=1000 OMP_WAIT_POLICY=PASSIVE python scripts/openmp_wait.py [--ops 1000]

The wait setting is whatever the environment gives (OpenMP reads it once, when torch loads):
nothing for libgomp's default (spin up to 300,000 rounds), OMP_WAIT_POLICY=PASSIVE (sleep at
once), GOMP_SPINCOUNT=<rounds>, OMP_NUM_THREADS=1 (one thread: no waiting). Run it beside
other work to see what a busy core does to each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1000)
    args = parser.parse_args()
    x, y = torch.randn(200_000), torch.randn(200_000)
    for _ in range(50):  # the thread team starts
        x.add_(y)
    started = time.perf_counter()
    for _ in range(args.ops):
        x.add_(y)
    seconds = time.perf_counter() - started
    settings = {key: os.environ[key] for key in
                ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if key in os.environ}
    print(json.dumps({"threads": torch.get_num_threads(), **settings,
                      "us_per_op": round(seconds / args.ops * 1e6, 1)}))


if __name__ == "__main__":
    main()
