"""Scaling curves: samples/s and peak RSS per rank against rows per table, tables and batch
size, on 1 and 2 ranks, every point a whole job.

    for pass in 1 2 3; do
        python scripts/scaling_curves.py --idle-below 0.3 --out bench_results/curves_$pass.json
    done
    python scripts/scaling_curves.py --plot bench_results/curves_*.json --png-dir docs

Three sweeps from ``experiment=reference_shape`` (``SWEEPS`` says what each varies and what it
holds). Every point runs as one process (``python -m train``, both cores) and as 2 ranks
(``torchrun --standalone --nproc_per_node 2 -m train``, one core each); OMP threads = cores /
ranks, as in scripts/benchmark.py. A job trains the warm-up steps that throughput leaves out
plus enough steps to measure about ``--measured-samples`` samples per rank (at least
``--min-measured-steps``), then one eval batch; no checkpoint, no W&B.

Per job: samples/s (``summary.json``, global, after the warm-up), the step time (the mean of
metrics.jsonl's report windows after the first), each rank's peak RSS (VmHWM at the last
report: the build, table init and training; not the final eval and state digest, which
summary.json's max-rank figure includes), the planned table bytes per rank and the sharding
types the planner chose, and how many CPUs other processes kept busy meanwhile (the machine's
busy CPU time less the jobs', over the wall time; ``--idle-below`` waits before each job
until the machine is that quiet). Unless ``--no-breakdown``, each job also profiles three warm-up
steps and splits them into the stages of scripts/benchmark.py (``train/step_breakdown.py``).
The JSON is rewritten after every job. ``--plot`` draws from finished JSONs without running
anything; given several passes (a shared machine's load changes within minutes: passes run at
different times are interleaved rounds), each point is the pass with its median samples/s,
with the range of all passes. One PNG per sweep (samples/s above, peak RSS per rank below) and
a markdown table per sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import PROFILE_STEPS, gib, last_window, median_of, torchrun  # noqa: E402
from train.loop import WARMUP_STEPS  # noqa: E402
from train.step_breakdown import STAGES, trace_breakdown  # noqa: E402

REFERENCE = ("experiment=reference_shape",)
REFERENCE_BATCH = 2048  # conf/experiment/reference_shape.yaml, per rank
# 16-dim tables: DLRM's dot interaction needs the bottom MLP to end in the tables' dim.
DIM_16 = ("features.embedding_dim=16", "model.dense_layer_sizes=[256,16]")


@dataclass(frozen=True)
class Sweep:
    """One curve: ``keys`` all set to each of ``values`` on top of ``fixed``."""

    name: str
    keys: tuple[str, ...]
    values: tuple[int, ...]
    fixed: tuple[str, ...]
    x_label: str
    shape: str  # what the sweep holds, for the plot's title and the docs


SWEEPS = {
    # 26 tables x 1e7 rows x 64 dims would be 67 GB: 4 tables of 16 dims keep the largest
    # point at 2.72 GB of tables and optimizer state in one process.
    "rows": Sweep(
        "rows",
        ("features.generated.num_embeddings", "features.generated.id_space"),
        (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000),
        (*REFERENCE, "features.generated.num_tables=4", *DIM_16),
        "rows per table (= ID space)",
        "4 tables x 16 dims, batch 2048 per rank",
    ),
    # At 64 dims, 258 tables took 5.5 s a step (the interaction and the top MLP's first layer
    # grow with the square of the features) and 6.7 GB: 16 dims, as features=many_tables.
    "tables": Sweep(
        "tables",
        ("features.generated.num_tables",),
        (26, 52, 104, 258),
        (*REFERENCE, *DIM_16),
        "tables",
        "100k rows x 16 dims per table, batch 2048 per rank",
    ),
    "batch": Sweep(
        "batch",
        ("trainer.batch_size",),
        (256, 512, 1024, 2048, 4096, 8192),
        REFERENCE,
        "batch size per rank",
        "26 tables x 100k rows x 64 dims (the reference shape)",
    ),
}
RANKS = (1, 2)


@dataclass(frozen=True)
class Point:
    sweep: str
    value: int
    ranks: int

    def overrides(self) -> list[str]:
        sweep = SWEEPS[self.sweep]
        return [*sweep.fixed, *(f"{key}={self.value}" for key in sweep.keys)]

    def batch_size(self) -> int:
        sweep = SWEEPS[self.sweep]
        return self.value if "trainer.batch_size" in sweep.keys else REFERENCE_BATCH


def points(sweeps: list[str], ranks: tuple[int, ...] = RANKS,
           values: tuple[int, ...] | None = None) -> list[Point]:
    """Every job of the sweeps (only ``values`` where given), each value's ranks back to back
    (so that the 1- and 2-rank jobs of a point see the same load)."""
    return [Point(name, value, n) for name in sweeps for value in SWEEPS[name].values
            if values is None or value in values for n in ranks]


def steps_for(batch_size: int, measured_samples: int, min_measured_steps: int) -> int:
    """The warm-up steps plus enough to measure ``measured_samples`` samples per rank: a small
    batch's steps are short, and a fixed step count would time it for too short a while."""
    measured = max(min_measured_steps, math.ceil(measured_samples / batch_size))
    return WARMUP_STEPS + measured


def metrics_windows(metrics_path: Path) -> list[dict]:
    """The report windows of a run's metrics.jsonl (``kind: metrics`` with a step time)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    return [r for r in records if r.get("kind") == "metrics" and "perf/step_seconds" in r]


def peak_rss_per_rank(windows: list[dict]) -> list[int]:
    """Each rank's peak RSS over the run's reports, ranks in order (rank10 after rank9)."""
    pattern = re.compile(r"^mem/peak_rss_bytes/rank(\d+)$")
    peaks: dict[int, float] = {}
    for window in windows:
        for key, value in window.items():
            match = pattern.match(key)
            if match:
                rank = int(match.group(1))
                peaks[rank] = max(peaks.get(rank, 0.0), value)
    if sorted(peaks) != list(range(len(peaks))):
        raise ValueError(f"peak RSS reported for ranks {sorted(peaks)}, not 0..{len(peaks) - 1}")
    return [int(peaks[rank]) for rank in range(len(peaks))]


def job_command(point: Point, steps: int, run_dir: Path, breakdown: bool) -> tuple[list[str], list[str]]:
    """The job's command line and its overrides (the run dir last)."""
    profile = ["trainer.profile=true", "trainer.profile_steps=[%d,%d]" % PROFILE_STEPS]
    overrides = [*point.overrides(), f"trainer.steps={steps}", "trainer.eval_every=0",
                 "data.eval_batches=1", "logger.mode=disabled", "checkpoint.at_end=false",
                 *(profile if breakdown else []), f"hydra.run.dir={run_dir}"]
    launcher = [sys.executable] if point.ranks == 1 else torchrun(point.ranks)
    return [*launcher, "-m", "train", *overrides], overrides


# Environment that changes how a job runs (threads, allocator, page sizes): shown with its
# command, so that the command reproduces the figure.
RUNTIME_ENV = ("OMP_", "GOMP_", "KMP_", "MALLOC_", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def printable(point: Point, threads: int, overrides: list[str]) -> str:
    launcher = "python" if point.ranks == 1 else (
        f"torchrun --standalone --nproc_per_node {point.ranks}")
    shown = [shlex.quote(o) for o in overrides if not o.startswith("hydra.run.dir")]
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith(RUNTIME_ENV) and k != "OMP_NUM_THREADS"]
    return " ".join([*env, f"OMP_NUM_THREADS={threads}", launcher, "-m", "train", *shown])


def busy_cpu_seconds() -> float:
    """CPU seconds the machine has been busy since boot, all processes (/proc/stat; steal
    counts: the host gave the CPU to someone else)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this script and of every job it has waited for (torchrun's ranks too)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


class OtherLoad:
    """How many CPUs other processes kept busy over an interval: the machine's busy CPU
    seconds less ours, over the wall time. The load average cannot tell them from ours."""

    def __init__(self) -> None:
        self.started = (time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds())

    def cpus(self) -> float:
        wall, busy, own = self.started
        elapsed = time.perf_counter() - wall
        return max(0.0, (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)) / elapsed


def wait_for_idle(max_cpus: float, patience: float, probe: float = 3.0) -> float:
    """Wait (at most ``patience`` seconds) until other processes use under ``max_cpus``
    CPUs over ``probe`` seconds; returns the last figure. A job started beside a busy
    neighbour measures the neighbour."""
    deadline = time.perf_counter() + patience
    while True:
        load = OtherLoad()
        time.sleep(probe)
        cpus = load.cpus()
        if cpus < max_cpus or time.perf_counter() > deadline:
            return cpus
        time.sleep(10.0)


def run_point(point: Point, measured_samples: int, min_measured_steps: int, breakdown: bool,
              timeout: float) -> dict:
    threads = max(1, (os.cpu_count() or 1) // point.ranks)
    steps = steps_for(point.batch_size(), measured_samples, min_measured_steps)
    with tempfile.TemporaryDirectory(prefix=f"curves-{point.sweep}-{point.value}-") as scratch:
        run_dir = Path(scratch) / "run"
        command, overrides = job_command(point, steps, run_dir, breakdown)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        result = {"sweep": point.sweep, "value": point.value, "ranks": point.ranks,
                  "omp_threads": threads, "steps": steps, "batch_size": point.batch_size(),
                  "command": printable(point, threads, overrides),
                  "load_average_before": os.getloadavg()}
        started, others = time.perf_counter(), OtherLoad()
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**result, "error": f"timed out after {timeout:.0f} s"}
        result["wall_seconds"] = time.perf_counter() - started
        result["load_average_after"] = os.getloadavg()
        result["other_cpus"] = others.cpus()
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            return {**result, "error": lines[-1] if lines else f"exit {done.returncode}"}
        summary = json.loads((run_dir / "summary.json").read_text())
        windows = metrics_windows(run_dir / "metrics.jsonl")
        result.update({
            "samples_per_sec": summary["samples_per_sec"],
            "step_ms": 1000 * last_window(run_dir / "metrics.jsonl")["perf/step_seconds"],
            "peak_rss_bytes_per_rank": peak_rss_per_rank(windows),
            "peak_rss_bytes_at_end": summary["peak_rss_bytes"],
            "embedding_bytes_per_rank": summary["embedding_bytes_per_rank"],
            "sharding": dict(Counter(t["type"] for t in summary["sharding"].values())),
            "precision": summary["precision"],
        })
        if breakdown:
            traces = [trace_breakdown(p) for p in sorted((run_dir / "profile").glob("rank_*.json"))]
            result["stage_ms"] = {s: sum(t["stage_ms"][s] for t in traces) / len(traces)
                                  for s in STAGES}
    return result


def machine() -> dict:
    """What the figures were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor())
    caches = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "caches": [line.strip() for line in caches.splitlines() if "cache" in line],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def successful(results: list[dict], sweep: str, ranks: int) -> list[dict]:
    return sorted((r for r in results if r["sweep"] == sweep and r["ranks"] == ranks
                   and "error" not in r), key=lambda r: r["value"])


def plot(results: list[dict], sweep_name: str, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = SWEEPS[sweep_name]
    figure, (rate_axis, memory_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 7), dpi=120)
    colours = {1: "tab:blue", 2: "tab:orange"}
    for ranks in RANKS:
        curve = successful(results, sweep_name, ranks)
        if not curve:
            continue
        xs = [r["value"] for r in curve]
        label = "1 process x 2 threads" if ranks == 1 else f"{ranks} ranks x 1 thread"
        rates = [r["samples_per_sec"] for r in curve]
        spread = [r.get("samples_per_sec_all", [r["samples_per_sec"]]) for r in curve]
        rate_axis.errorbar(xs, rates, yerr=[[y - min(a) for y, a in zip(rates, spread)],
                                            [max(a) - y for y, a in zip(rates, spread)]],
                           marker="o", capsize=3, color=colours[ranks], label=label)
        for rank, style in zip(range(ranks), ("-", ":")):
            memory_axis.plot(xs, [r["peak_rss_bytes_per_rank"][rank] / 2**30 for r in curve],
                             marker="o", linestyle=style, color=colours[ranks],
                             label=f"{label}: peak RSS of rank {rank}")
        memory_axis.plot(xs, [max(r["embedding_bytes_per_rank"]) / 2**30 for r in curve],
                         marker="x", linestyle="--", color=colours[ranks], alpha=0.6,
                         label=f"{label}: planned tables + optimizer state per rank")
    rate_axis.set_ylabel("samples/s (global)\n(median of passes, bars: range)"
                         if report_passes(results) > 1 else "samples/s (global)")
    rate_axis.set_ylim(bottom=0)
    memory_axis.set_ylabel("GiB per rank")
    memory_axis.set_xlabel(sweep.x_label)
    for axis in (rate_axis, memory_axis):
        axis.set_xscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    values = list(sweep.values)
    memory_axis.set_xticks(values, [f"{v:,}" for v in values])
    memory_axis.minorticks_off()
    rate_axis.set_title(f"{sweep.shape}\n{note}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def report_passes(results: list[dict]) -> int:
    return max((len(r.get("samples_per_sec_all", [])) for r in results), default=1) or 1


def markdown(results: list[dict], sweep_name: str) -> str:
    sweep = SWEEPS[sweep_name]
    lines = [f"| {sweep.x_label} | ranks | samples/s (global) | step ms | peak RSS per rank "
             "| planned tables per rank | sharding | other processes' CPUs |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in sorted((r for r in results if r["sweep"] == sweep_name),
                    key=lambda r: (r["value"], r["ranks"])):
        if "error" in r:
            lines.append(f"| {r['value']:,} | {r['ranks']} | failed: {r['error']} | | | | | |")
            continue
        rate = f"{r['samples_per_sec']:,.0f}"
        if len(r.get("samples_per_sec_all", [])) > 1:
            rate += " (%s)" % "-".join(f"{v:,.0f}" for v in (min(r["samples_per_sec_all"]),
                                                            max(r["samples_per_sec_all"])))
        peaks = ", ".join(gib(v) for v in r["peak_rss_bytes_per_rank"])
        sharding = ", ".join(f"{n} {kind}" for kind, n in sorted(r["sharding"].items()))
        load = f"{r['other_cpus']:.2f}"
        lines.append(f"| {r['value']:,} | {r['ranks']} | {rate} | {r['step_ms']:.1f} | {peaks} "
                     f"| {gib(max(r['embedding_bytes_per_rank']))} | {sharding} | {load} |")
    return "\n".join(lines)


def merge(reports: list[dict]) -> dict:
    """One report from several passes: per point, the pass with the median samples/s (its
    peak RSS and the rest with it) and every pass's samples/s; a failure only where every
    pass failed."""
    by_point: dict[tuple, list[dict]] = {}
    for report in reports:
        for result in report["results"]:
            by_point.setdefault((result["sweep"], result["value"], result["ranks"]), []).append(result)
    results = []
    for runs in by_point.values():
        ok = [r for r in runs if "error" not in r]
        results.append(median_of(ok) if ok else runs[-1])
    sweeps = list(dict.fromkeys(name for report in reports for name in report["sweeps"]))
    dates = sorted(report["machine"]["date"] for report in reports)
    return {"machine": {**reports[0]["machine"], "date": dates[0], "dates": dates},
            "sweeps": sweeps, "passes": len(reports), "results": results}


def draw(report: dict, png_dir: Path) -> None:
    results = report["results"]
    for name in report["sweeps"]:
        done = [r for r in results if r["sweep"] == name and "error" not in r]
        loads = [r["other_cpus"] for r in done]
        passes = report.get("passes", 1)
        note = (f"{report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
                f"{report['machine']['date'][:10]}"
                + (f", median of {passes} passes" if passes > 1 else "")
                + (f", other processes used {min(loads):.2f}-{max(loads):.2f} CPUs"
                   if loads else ""))
        path = png_dir / f"scaling_{name}.png"
        plot(results, name, path, note)
        print(f"\n{name}: {SWEEPS[name].shape}\n{markdown(results, name)}\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS), choices=RANKS)
    parser.add_argument("--values", nargs="+", type=int, default=None,
                        help="only these values of the sweeps (a rerun of some points)")
    parser.add_argument("--measured-samples", type=int, default=40 * REFERENCE_BATCH,
                        help="samples per rank to measure after the warm-up")
    parser.add_argument("--min-measured-steps", type=int, default=20)
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the profiled warm-up steps and their stage split")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per job")
    parser.add_argument("--idle-below", type=float, default=None, metavar="CPUS",
                        help="before each job, wait until other processes use fewer CPUs")
    parser.add_argument("--idle-wait", type=float, default=600.0,
                        help="seconds to wait for that at most, then run anyway")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "scaling_curves.json")
    parser.add_argument("--png-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--plot", type=Path, nargs="+", default=None,
                        help="draw the pictures and tables from these passes' JSONs; run nothing")
    args = parser.parse_args()
    if args.plot:
        draw(merge([json.loads(path.read_text()) for path in args.plot]), args.png_dir)
        return
    report = {"machine": machine(), "sweeps": args.sweeps, "argv": sys.argv[1:], "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jobs = points(args.sweeps, tuple(args.ranks), tuple(args.values) if args.values else None)
    if not jobs:
        raise SystemExit(f"--values {args.values}: none is a value of {', '.join(args.sweeps)}")
    for index, point in enumerate(jobs):
        idle = (wait_for_idle(args.idle_below, args.idle_wait)
                if args.idle_below is not None else None)
        result = run_point(point, args.measured_samples, args.min_measured_steps,
                           not args.no_breakdown, args.timeout)
        result["other_cpus_before"] = idle
        report["results"].append(result)
        args.out.write_text(json.dumps(report, indent=2))
        shown = ("failed: " + result["error"]) if "error" in result else (
            f"{result['samples_per_sec']:,.0f} samples/s, peak RSS "
            + ", ".join(gib(v) for v in result["peak_rss_bytes_per_rank"]))
        print(f"[{index + 1}/{len(jobs)}] {point.sweep}={point.value:,} ranks={point.ranks}: "
              f"{shown} ({result.get('wall_seconds', 0):.0f} s, other processes "
              f"{result.get('other_cpus', float('nan')):.2f} CPUs)", flush=True)
    report["machine"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.out.write_text(json.dumps(report, indent=2))
    draw(report, args.png_dir)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
