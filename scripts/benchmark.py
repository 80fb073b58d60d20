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

Each job also profiles a few of its warm-up steps (``trainer.profile``, steps
``PROFILE_STEPS``: inside the warm-up that throughput leaves out, so the profiler does not
slow the measured steps) and reports its step split into stages (data, ID mapping, input
distribution, embedding lookup, output all-to-all, dense forward, embedding and dense
backward, optimizer: ``train/step_breakdown.py`` says how each is read from the trace), and
how close it runs to the machine's limits, measured right after the job: the matmul FLOP/s
of one core in each dtype the job's matmuls use and one core's copy bandwidth, times the job's
cores (threads) per rank. ``--no-breakdown`` skips both.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.build import feature_groups  # noqa: E402
from train.export import load_run_config  # noqa: E402
from train.hashing.budget import budget_facts  # noqa: E402
from train.loop import WARMUP_STEPS  # noqa: E402
from train.step_breakdown import (  # noqa: E402
    STAGES,
    bound_shares,
    embedding_bytes_per_sample,
    lookups_per_sample,
    trace_breakdown,
)

# The profiled steps, [first, count]: inside the warm-up (train.loop.WARMUP_STEPS) that
# throughput leaves out, after the pipeline has filled and the kernels have been built; the
# trace is written at the last profiled step's end, also inside the warm-up.
PROFILE_STEPS = (WARMUP_STEPS - 5, 3)
# name -> (Hydra overrides, ranks; None = --nproc). The 1-process variants keep the global
# batch of 2 ranks x 2048 and give the one rank every core.
CONFIGS: dict[str, tuple[list[str], int | None]] = {
    "reference_shape": (["experiment=reference_shape"], None),
    "reference_shape_1proc": (["experiment=reference_shape", "trainer.batch_size=4096"], 1),
    "default": ([], None),
    "billion_users_multi_hash": (["experiment=billion_users", "hashing=multi_hash"], None),
    "many_tables": (["features=many_tables"], None),
    # The same shape with 26 tables (24 generated + user + ad): what 258 tables cost beyond 26.
    "many_tables_26": (["features=many_tables", "features.generated.num_tables=24"], None),
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


def run_config(
    name: str, nproc: int, steps: int, extra: list[str], breakdown: bool = True
) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config_overrides, config_nproc = CONFIGS[name]
    nproc = config_nproc or nproc
    # The profiled steps must lie inside the run.
    breakdown = breakdown and steps >= sum(PROFILE_STEPS)
    profile = ["trainer.profile=true", "trainer.profile_steps=[%d,%d]" % PROFILE_STEPS]
    overrides = [*config_overrides, f"trainer.steps={steps}", "trainer.eval_every=0",
                 "checkpoint.at_end=false", f"hydra.run.dir={run_dir}",
                 *(profile if breakdown else []), *extra]
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
    result = {
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
        "load_average": os.getloadavg(),
        "command": "OMP_NUM_THREADS=%d " % threads + " ".join(
            ["torchrun", "--standalone", f"--nproc_per_node {nproc}", "-m", "train",
             *(shlex.quote(o) for o in overrides if not o.startswith("hydra.run.dir"))]
        ),
    }
    if breakdown:
        result["breakdown"] = step_breakdown(run_dir, summary["world_size"], threads,
                                             result["step_ms"] / 1000)
    return result


def run_lookups(run_dir: Path, world_size: int) -> tuple[list[tuple[int, int]], str]:
    """The run's lookups per sample (``lookups_per_sample``) and its embedding optimizer."""
    config, _ = load_run_config(run_dir)
    # As training built them (a hashing budget per rank sizes tables for the world size).
    groups = feature_groups(config.features, config.hashing, budget_facts(config, world_size))
    return lookups_per_sample(groups), config.optim.embedding


def step_breakdown(run_dir: Path, world_size: int, threads: int, step_seconds: float) -> dict:
    """Stage ms per step (the mean over ranks of their profiled steps), matmul FLOPs and
    embedding bytes per step and rank, the machine's bounds measured now, and the shares."""
    ranks = [trace_breakdown(path) for path in sorted((run_dir / "profile").glob("rank_*.json"))]
    if not ranks:
        raise SystemExit(f"{run_dir}: no profile traces; was trainer.profile honoured?")
    stage_ms = {s: sum(r["stage_ms"][s] for r in ranks) / len(ranks) for s in STAGES}
    dtypes = sorted({dtype for r in ranks for dtype in r["flops_per_step"]} | {"fp32"})
    flops = {d: sum(r["flops_per_step"].get(d, 0.0) for r in ranks) / len(ranks) for d in dtypes}
    lookups, optimizer = run_lookups(run_dir, world_size)
    config, _ = load_run_config(run_dir)
    embedding_bytes = config.trainer.batch_size * embedding_bytes_per_sample(lookups, optimizer)
    bounds = machine_bounds(dtypes)
    # A rank's limits: its cores' (threads') sum. Memory bandwidth grows less than linearly
    # with cores, so the memory share is a lower bound where a rank has several.
    shares = bound_shares(
        step_seconds,
        flops,
        {d: bounds["matmul_flops_per_sec_per_core"][d] * threads for d in dtypes},
        embedding_bytes,
        bounds["copy_bytes_per_sec_per_core"] * threads,
    )
    return {
        "stage_ms": stage_ms,
        "profiled_step_ms": sum(r["profiled_step_ms"] for r in ranks) / len(ranks),
        "profiled_steps": list(PROFILE_STEPS),
        "matmul_flops_per_step": flops,
        "embedding_bytes_per_step": embedding_bytes,
        **bounds,
        "cores_per_rank": threads,
        **shares,
    }


def machine_bounds(dtypes: list[str], seconds: float = 0.5) -> dict:
    """One core's limits: the matmul FLOP/s of one thread per dtype, and the bytes per second
    one thread's ``dst.copy_(src)`` moves (read + write). Timed in the thread's own CPU time,
    so that other jobs on a shared machine, which take the core away, do not lower it."""
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                    "fp64": torch.float64}
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        per_core = {}
        for dtype in dtypes:
            a = torch.randn(1024, 1024).to(torch_dtypes[dtype])
            per_core[dtype] = 2 * 1024**3 / _seconds_per_call(lambda: a @ a, seconds)
        source = torch.ones(1 << 26)  # 256 MiB: far beyond the caches
        target = torch.empty_like(source)
        copy = 2 * source.numel() * 4 / _seconds_per_call(lambda: target.copy_(source), seconds)
    finally:
        torch.set_num_threads(previous)
    return {"matmul_flops_per_sec_per_core": per_core, "copy_bytes_per_sec_per_core": copy}


def _seconds_per_call(call, seconds: float) -> float:
    """The least CPU time of repeated calls over about ``seconds`` of CPU (after a warm call)."""
    call()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        started = time.thread_time()
        call()
        elapsed = time.thread_time() - started
        best, spent = min(best, elapsed), spent + elapsed
    return best


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


def breakdown_header() -> str:
    columns = ["job", "step ms (profiled)", *STAGES, "matmul GFLOP", "compute bound",
               "embedding MB", "memory bound"]
    return "| " + " | ".join(columns) + " |\n|" + " --- |" + " ---: |" * (len(columns) - 1)


def breakdown_row(result: dict) -> str:
    """Stage ms per step; the matmul work and embedding bytes per step and rank, with the
    share of the machine's limit each reaches (the step time at the limit over the measured
    step time)."""
    split = result["breakdown"]
    stages = " | ".join(f"{split['stage_ms'][stage]:.1f}" for stage in STAGES)
    flops = sum(split["matmul_flops_per_step"].values())
    return (
        f"| {result['config']} | {result['step_ms']:.1f} ({split['profiled_step_ms']:.1f}) "
        f"| {stages} | {flops / 1e9:.2f} | {100 * split['compute_bound_share']:.1f}% "
        f"| {split['embedding_bytes_per_step'] / 1e6:.1f} "
        f"| {100 * split['memory_bound_share']:.1f}% |"
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
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the profiled steps and the step breakdown")
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
            results.append(run_config(name, args.nproc, args.steps, args.override,
                                      breakdown=not args.no_breakdown))
        rounds.append(results)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{r['config']} {r['samples_per_sec']:,.0f}" for r in results)
            + " (load average %.1f)" % os.getloadavg()[0], flush=True)
    results = [median_of([round_[i] for round_ in rounds]) for i in range(len(rounds[0]))]
    for result in results:
        print(markdown_row(result), flush=True)
    broken_down = [result for result in results if "breakdown" in result]
    if broken_down:
        print("\nstep ms (profiled steps in brackets), stages in ms per step and rank; "
              "bounds per rank: time at the limit / measured step time", flush=True)
        print(breakdown_header())
        for result in broken_down:
            print(breakdown_row(result), flush=True)
        bounds = broken_down[-1]["breakdown"]
        print("machine now: matmul " + ", ".join(
            f"{d} {v / 1e9:.0f} GFLOP/s per core"
            for d, v in bounds["matmul_flops_per_sec_per_core"].items())
            + f"; copy {bounds['copy_bytes_per_sec_per_core'] / 1e9:.1f} GB/s per core "
            f"(CPU time of one thread); load average "
            + " ".join(f"{v:.1f}" for v in os.getloadavg()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
