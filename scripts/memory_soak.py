"""Memory stability: run a long job and check that host RSS stays flat.

    python scripts/memory_soak.py --steps 5000 [extra Hydra overrides...]

Runs ``python -m train`` (the default job unless overridden) with a report every
``--every`` steps, reads the RSS of every report from the run's metrics.jsonl, and prints RSS
after warm-up, at the end, the growth in between, and a least-squares slope in bytes per
1,000 steps. A leak of even a few bytes per step shows as a steady slope over thousands of
steps; allocator noise does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    den = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    command = [sys.executable, "-m", "train", f"trainer.steps={args.steps}",
               f"logger.log_every={args.every}", "trainer.eval_every=0", "checkpoint.at_end=false",
               "logger.progress_bar=false", f"hydra.run.dir={run_dir}", *args.overrides]
    subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   stdout=subprocess.DEVNULL)
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["mem/rss_bytes_max"]) for r in reports
              if r.get("kind") == "metrics" and "mem/rss_bytes_max" in r]
    settled = [p for p in points if p[0] >= max(500, args.every * 3)]  # past warm-up
    steps, rss = [p[0] for p in settled], [p[1] for p in settled]
    result = {
        "steps": args.steps,
        "reports": len(settled),
        "rss_after_warmup_bytes": rss[0],
        "rss_end_bytes": rss[-1],
        "rss_max_bytes": max(rss),
        "growth_bytes": rss[-1] - rss[0],
        "slope_bytes_per_1000_steps": 1000 * slope(steps, rss),
        "command": " ".join(["python", "scripts/memory_soak.py", f"--steps {args.steps}", *args.overrides]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
