"""How much does hashing cost per training step? `hash` vs `modulo` on the default job.

    python scripts/bench_hashing.py [--steps 600] [--repeats 2] [extra Hydra overrides]

Two measurements, both on the default job's features and batch size:
1. the ID mappers alone (every group's raw-ID -> row mapping of one batch), hash vs modulo,
   median over many batches: the direct cost, free of training-loop noise;
2. the whole job (`python -m train`, no eval, W&B off) with hashing=default (hash) and
   hashing=modulo, run alternately `--repeats` times each, samples/s from summary.json.
The overhead is reported as (mapper hash - mapper modulo) / step time, and as the end-to-end
throughput difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from modules.id_mapping import HashingIdMapper  # noqa: E402
from train.build import feature_groups  # noqa: E402
from train.compose import compose_config  # noqa: E402
from train.data import planted_data  # noqa: E402


def mapper_seconds(hashing: str, overrides: list[str], num_batches: int = 50) -> float:
    """Median seconds to map one batch of every group (one training step's mapping)."""
    config = compose_config([*overrides, f"hashing={hashing}"])
    groups = feature_groups(config.features, config.hashing)
    data = planted_data(config, groups)
    mappers = {g.name: HashingIdMapper(list(g.features)) for g in groups}
    batches = [data.batch("train", 0, step)[0] for step in range(num_batches)]
    times = []
    for _ in range(3):
        for batch in batches:
            started = time.perf_counter()
            for name, mapper in mappers.items():
                mapper(batch.sparse_features[name])
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def job_samples_per_sec(hashing: str, steps: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "train", f"hashing={hashing}", f"trainer.steps={steps}",
                   "trainer.eval_every=0", "logger.mode=disabled", f"hydra.run.dir={run_dir}",
                   *overrides]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        return json.loads((Path(run_dir) / "summary.json").read_text())["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(torch.get_num_threads())
    mapper = {h: mapper_seconds(h, overrides) for h in ("modulo", "default", "modulo", "default")}
    runs: dict[str, list[float]] = {"modulo": [], "default": []}
    for _ in range(args.repeats):
        for hashing in ("modulo", "default"):
            runs[hashing].append(job_samples_per_sec(hashing, args.steps, overrides))
    batch_size = compose_config(overrides).trainer.batch_size
    modulo_rate = statistics.median(runs["modulo"])
    hash_rate = statistics.median(runs["default"])
    step_seconds = batch_size / modulo_rate
    extra = mapper["default"] - mapper["modulo"]
    print(f"mapper per step: modulo {1e3 * mapper['modulo']:.3f} ms, hash {1e3 * mapper['default']:.3f} ms "
          f"(+{1e3 * extra:.3f} ms)")
    print(f"step time (modulo job): {1e3 * step_seconds:.2f} ms; hash mapping overhead "
          f"{100 * extra / step_seconds:.2f}% of a step")
    print(f"job samples/s: modulo {[round(r) for r in runs['modulo']]}, hash "
          f"{[round(r) for r in runs['default']]}; median difference "
          f"{100 * (modulo_rate - hash_rate) / modulo_rate:+.2f}% (positive = hash slower)")


if __name__ == "__main__":
    main()
