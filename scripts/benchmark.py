"""Benchmark named hashrec configurations as whole jobs under torchrun.

    python scripts/benchmark.py reference_shape default --nproc 2 --steps 300 --baseline

Each configuration runs as ``torchrun --standalone --nproc_per_node N -m train ...`` with
its own data, metrics and logging (W&B offline + metrics.jsonl), OMP threads = cores / N.
Throughput is hashrec's own ``samples_per_sec`` (global, after a 10-step warm-up); the
step-time split (waiting for data vs forward+backward+optimizer) and per-rank peak RSS come
from the run's metrics.jsonl. ``--baseline`` also runs scripts/torchrec_baseline.py (TorchRec's
own minimal loop in the reference shape) in the same invocation, so the two are compared on
the same machine under the same load. Results go to a JSON file and print as markdown rows
with the command behind each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> (Hydra overrides, ranks; None = --nproc). The 1-process variants keep the global
# batch of 2 ranks x 2048 and give the one rank every core.
CONFIGS: dict[str, tuple[list[str], int | None]] = {
    "reference_shape": (["experiment=reference_shape"], None),
    "reference_shape_1proc": (["experiment=reference_shape", "trainer.batch_size=4096"], 1),
    "default": ([], None),
    "billion_users_multi_hash": (["experiment=billion_users", "hashing=multi_hash"], None),
    "many_tables": (["features=many_tables"], None),
    # The reference shape with 10x the rows (3.4 GB of tables per rank at 2 ranks): peak RSS
    # against planned bytes where the tables, not the runtime, dominate.
    "reference_shape_1m_rows": (["experiment=reference_shape",
                                 "features.generated.num_embeddings=1000000",
                                 "features.generated.id_space=1000000"], None),
}


def torchrun(nproc: int) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]


def last_window(metrics_path: Path) -> dict:
    """The mean of the per-window figures over the run's reports (skipping the warm-up)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    windows = [r for r in rows if r.get("kind") == "metrics" and "perf/step_seconds" in r]
    windows = windows[1:] or windows  # the first window holds the warm-up steps
    keys = [k for k in windows[0] if k.startswith(("perf/", "mem/"))]
    return {k: sum(w[k] for w in windows if k in w) / len(windows) for k in keys}


def run_config(name: str, nproc: int, steps: int, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config_overrides, config_nproc = CONFIGS[name]
    nproc = config_nproc or nproc
    overrides = [*config_overrides, f"trainer.steps={steps}", "trainer.eval_every=0",
                 "checkpoint.at_end=false", f"hydra.run.dir={run_dir}", *extra]
    command = [*torchrun(nproc), "-m", "train", *overrides]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    window = last_window(run_dir / "metrics.jsonl")
    per_rank_peak = [v for k, v in sorted(window.items()) if k.startswith("mem/peak_rss_bytes/rank")]
    planned = summary["embedding_bytes_per_rank"]
    return {
        "config": name,
        "world_size": summary["world_size"],
        "omp_threads": threads,
        "samples_per_sec": summary["samples_per_sec"],
        "step_ms": 1000 * window.get("perf/step_seconds", float("nan")),
        "data_wait_ms": 1000 * window.get("perf/data_wait_seconds", float("nan")),
        "compute_ms": 1000 * window.get("perf/compute_seconds", float("nan")),
        "peak_rss_bytes_per_rank": per_rank_peak,
        "embedding_bytes": summary["embedding_bytes"],
        "embedding_bytes_per_rank": planned,
        "rss_over_planned": max(per_rank_peak) / max(planned) if per_rank_peak and max(planned) else None,
        "eval_auc": summary["eval_auc"],
        "wall_seconds": time.perf_counter() - started,
        "command": "OMP_NUM_THREADS=%d " % threads + " ".join(
            ["torchrun", "--standalone", f"--nproc_per_node {nproc}", "-m", "train",
             *(shlex.quote(o) for o in overrides if not o.startswith("hydra.run.dir"))]
        ),
    }


def run_baseline(nproc: int, steps: int, pin_cores: bool = False) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    flags = [f"--steps={steps}", *(["--pin-cores"] if pin_cores else [])]
    command = [*torchrun(nproc), str(REPO / "scripts" / "torchrec_baseline.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"baseline failed:\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("{"))
    return {**json.loads(line), "omp_threads": threads,
            "config": "torchrec_baseline" + ("_pinned" if pin_cores else ""),
            "command": f"OMP_NUM_THREADS={threads} torchrun --standalone --nproc_per_node {nproc} "
                       f"scripts/torchrec_baseline.py {' '.join(flags)}"}


def median_of(runs: list[dict]) -> dict:
    """The run with the median samples/s, annotated with the min and max of all rounds."""
    ordered = sorted(runs, key=lambda r: r["samples_per_sec"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["samples_per_sec_all"] = [r["samples_per_sec"] for r in runs]
    return chosen


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def rate(result: dict) -> str:
    runs = result.get("samples_per_sec_all", [result["samples_per_sec"]])
    text = f"{result['samples_per_sec']:,.0f}"
    return text if len(runs) == 1 else f"{text} ({min(runs):,.0f}-{max(runs):,.0f})"


def markdown_row(result: dict) -> str:
    if result["config"].startswith("torchrec_baseline"):
        return (f"| {result['config']} | {result['world_size']} | {rate(result)} "
                f"| - | - | - | `{result['command']}` |")
    peaks = ", ".join(gib(v) for v in result["peak_rss_bytes_per_rank"])
    return (
        f"| {result['config']} | {result['world_size']} | {rate(result)} "
        f"| {result['step_ms']:.1f} ({result['data_wait_ms']:.1f} data / {result['compute_ms']:.1f} compute) "
        f"| {peaks} | {gib(result['embedding_bytes'])} (RSS/planned {result['rss_over_planned']:.2f}) "
        f"| `{result['command']}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=list(CONFIGS), choices=[*CONFIGS, []])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--baseline", action="store_true", help="also run TorchRec's minimal loop")
    parser.add_argument("--pinned-baseline", action="store_true",
                        help="also run TorchRec's loop with each rank pinned to its own cores, "
                             "as hashrec's trainer.cpu_affinity=auto does")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "benchmark.json")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds; each round runs every job once (interleaved), medians reported")
    args = parser.parse_args()
    rounds: list[list[dict]] = []
    for round_index in range(args.repeats):
        results = []
        if args.baseline:
            results.append(run_baseline(args.nproc, args.steps))
        if args.pinned_baseline:
            results.append(run_baseline(args.nproc, args.steps, pin_cores=True))
        for name in args.configs:
            results.append(run_config(name, args.nproc, args.steps, args.override))
        rounds.append(results)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{r['config']} {r['samples_per_sec']:,.0f}" for r in results), flush=True)
    results = [median_of([round_[i] for round_ in rounds]) for i in range(len(rounds[0]))]
    for result in results:
        print(markdown_row(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
