"""The hashing trade-off from a sweep: eval AUC against actual bytes, and AUC against samples.

    python scripts/plot_tradeoff.py multirun/tradeoff --png docs/tradeoff.png \
        --curves-png docs/tradeoff_curves.png --markdown docs/tradeoff.md

Reads every results table under the given folders (``results.csv``, written when a sweep ends
by train/sweep_results.py; CSV paths work too). A point's method is its ``hashing`` override
(default ``hash``), ``budget`` when it set ``hashing.budget_bytes``, and ``+ weights`` is added
for multi-hashing with importance weights. Points of the same method and target compression
(``hashing.compression_ratio``, or full bytes / budget) over several seeds become one mark:
the mean, with the seeds' range as error bars. The x axis is the *actual* compression: the
full tables' bytes over the point's bytes (parameters, optimizer state and maps, from the
hashing report), so a method that keeps extra tables or maps sits where its bytes put it. The
full tables (``hashing=full``) are the reference line.

The second figure follows eval AUC over training samples (each run's ``metrics.jsonl``) for
the full tables and the two best methods at each of the two largest compressions.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS_FILE = "results.csv"  # train.sweep_results.RESULTS_FILE (this script needs no torch)
FULL = "full table"
LABELS = {"default": "hash", "full": FULL, "multi_hash": "multi_hash", "qr": "qr",
          "frequency": "frequency", "managed": "managed (MCH)", "modulo": "modulo",
          "shared": "shared table"}


def _number(text: str | None) -> float | None:
    return float(text) if text not in ("", None) else None


def _method(row: dict) -> str:
    if _number(row.get("hashing.budget_bytes")):
        return "budget"
    name = row.get("hashing") or "default"
    label = LABELS.get(name, name)
    if name == "multi_hash":  # conf/hashing/multi_hash.yaml has importance weights on
        share = _number(row.get("hashing.importance_share"))
        label += " + weights" if share is None or share > 0 else " (no weights)"
    return label


def _results_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob(RESULTS_FILE))
        elif path.exists():
            files.append(path)
    if not files:
        raise SystemExit(
            f"no {RESULTS_FILE} under {', '.join(map(str, paths))}: run the sweep to its end "
            f"(scripts/tradeoff_sweep.sh) first"
        )
    return files


def load_points(paths: list[Path]) -> list[dict]:
    """Every completed point of the results tables under ``paths``."""
    points = []
    for path in _results_files(paths):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            if row["status"] != "completed":
                print(f"skipping point {row['job_num']} of {path} ({row['status']}): "
                      f"{row['overrides']}")
                continue
            hashed = _number(row.get("embedding_bytes_hashed"))
            points.append({
                "method": _method(row),
                "ratio": _number(row.get("hashing.compression_ratio")),
                "budget_bytes": _number(row.get("hashing.budget_bytes")),
                "seed": int(_number(row.get("trainer.seed")) or 0),
                "embedding_bytes": hashed if hashed is not None else float(row["embedding_bytes"]),
                "eval_auc": float(row["eval_auc"]),
                "bayes_auc": float(row["eval_bayes_auc"]),
                "samples_per_step": float(row["samples"]) / float(row["steps"]),
                "run_dir": path.parent / row["dir"] if row.get("dir") else None,
                "collisions": {
                    key.split("/", 1)[1]: float(value)
                    for key, value in row.items()
                    if key.startswith("collision_rate/") and value != ""
                },
            })
    if not points:
        raise SystemExit(f"no completed point in {', '.join(map(str, paths))}")
    return points


def summarise(points: list[dict]) -> list[dict]:
    """One mark per (method, target compression): mean and range over seeds of the eval AUC
    and of its difference from the full tables' AUC *on the same seed* (seeds differ in data,
    so a difference between runs of one seed is what a method costs)."""
    full = [p for p in points if p["method"] == FULL]
    if not full:
        raise SystemExit("no full-table point (hashing=full): the reference line is missing")
    full_bytes = statistics.mean(p["embedding_bytes"] for p in full)
    full_auc = {p["seed"]: p["eval_auc"] for p in full}
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for p in points:
        if p["seed"] not in full_auc:
            print(f"skipping {p['method']} seed {p['seed']}: no full-table run of that seed")
            continue
        if p["method"] == FULL:
            target = 1.0
        elif p["budget_bytes"]:
            target = round(full_bytes / p["budget_bytes"])
        else:
            target = p["ratio"] or 1.0
        groups[(p["method"], target)].append(p)
    marks = []
    for (method, target), members in groups.items():
        aucs = [p["eval_auc"] for p in members]
        deltas = [p["eval_auc"] - full_auc[p["seed"]] for p in members]
        byte_counts = [p["embedding_bytes"] for p in members]
        user = [p["collisions"]["user_id"] for p in members if "user_id" in p["collisions"]]
        marks.append({
            "method": method, "target": target, "seeds": sorted(p["seed"] for p in members),
            "auc": statistics.mean(aucs), "auc_min": min(aucs), "auc_max": max(aucs),
            "delta": statistics.mean(deltas), "delta_min": min(deltas), "delta_max": max(deltas),
            "bytes": statistics.mean(byte_counts),
            "compression": full_bytes / statistics.mean(byte_counts),
            "bayes_auc": statistics.mean(p["bayes_auc"] for p in members),
            "user_collisions": statistics.mean(user) if user else None,
            "runs": members,
        })
    return sorted(marks, key=lambda m: (m["target"], -m["delta"]))


def full_mark(marks: list[dict]) -> dict:
    return next(m for m in marks if m["method"] == FULL)


def markdown(marks: list[dict]) -> str:
    reference = full_mark(marks)
    lines = [
        "| method | target | actual compression (bytes) | embedding bytes | seeds | eval AUC (mean) | AUC - full tables' (same seed: mean, range) | user_id collisions (eval) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in marks:
        user = m["user_collisions"]
        lines.append(
            f"| {m['method']} | {m['target']:g}x | {m['compression']:,.0f}x | "
            f"{m['bytes'] / 2**20:,.3f} MiB | {','.join(map(str, m['seeds']))} | "
            f"{m['auc']:.4f} | {m['delta']:+.4f} ({m['delta_min']:+.4f} .. {m['delta_max']:+.4f}) | "
            f"{'-' if user is None else f'{100 * user:.1f}%'} |"
        )
    lines.append("")
    lines.append(f"Bayes AUC of the eval data {reference['bayes_auc']:.4f}; "
                 f"full tables {reference['bytes'] / 2**20:,.1f} MiB.")
    lines += goal_lines(marks)
    return "\n".join(lines) + "\n"


def goal_lines(marks: list[dict]) -> list[str]:
    """The goal: the budget mode within 0.01 AUC of the full tables at the largest target
    compression, with plain hashing at the same target beside it."""
    reference = full_mark(marks)
    budget = [m for m in marks if m["method"] == "budget"]
    if not budget:
        return []
    best = max(budget, key=lambda m: m["target"])
    met = best["delta_min"] >= -0.01
    lines = ["", f"Goal (budget mode within 0.01 AUC of the full tables at {best['target']:g}x, "
             f"every seed): {'met' if met else 'not met'}: {best['compression']:,.0f}x fewer "
             f"bytes, AUC {best['delta']:+.4f} against the full tables on average over seeds "
             f"{','.join(map(str, best['seeds']))}, {best['delta_min']:+.4f} on its worst seed."]
    hashed = [m for m in marks if m["method"] == "hash" and m["target"] == best["target"]]
    if hashed:
        lines[-1] += (f" Plain hashing at {best['target']:g}x: {hashed[0]['compression']:,.0f}x "
                      f"fewer bytes, {hashed[0]['delta']:+.4f}.")
    return lines


def plot(marks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = full_mark(marks)
    curves: dict[str, list[dict]] = defaultdict(list)
    for m in marks:
        if m["method"] != FULL:
            curves[m["method"]].append(m)
    figure, axis = plt.subplots(figsize=(8, 5), dpi=120)
    for method, curve in sorted(curves.items()):
        curve.sort(key=lambda m: m["compression"])
        seeds = ",".join(map(str, curve[0]["seeds"]))
        axis.errorbar(
            [m["compression"] for m in curve], [m["delta"] for m in curve],
            yerr=[[m["delta"] - m["delta_min"] for m in curve],
                  [m["delta_max"] - m["delta"] for m in curve]],
            marker="o", capsize=3, label=f"{method} (seeds {seeds})",
        )
    axis.axhline(0.0, color="black",
                 label=f"full tables (eval AUC {reference['auc']:.4f}, mean of seeds)")
    axis.axhline(-0.01, color="black", linestyle=":", label="full tables - 0.01")
    axis.set_xscale("log")
    axis.set_xlabel("compression: full tables' bytes / bytes (parameters + optimizer state + maps)")
    axis.set_ylabel("eval AUC - full tables' eval AUC, same seed\n(mean over seeds, bars: range)")
    axis.set_title("hashing trade-off on planted data (experiment=tradeoff)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def eval_curve(run_dir: Path, samples_per_step: float) -> list[tuple[float, float]]:
    """(training samples, eval AUC) of every eval a run logged."""
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "metrics" and "eval/auc" in record:
            points.append((record["step"] * samples_per_step, record["eval/auc"]))
    return points


def plot_curves(marks: list[dict], path: Path) -> list[dict]:
    """AUC against samples on the one seed every mark has (seeds differ in data): the full
    tables and the two best methods at each of the two largest targets. Returns the marks
    drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(set.intersection(*(set(m["seeds"]) for m in marks)), default=None)
    if seed is None:
        raise SystemExit("no seed that every method ran: no AUC-against-samples figure")
    targets = sorted({m["target"] for m in marks if m["method"] != FULL})[-2:]
    chosen = [full_mark(marks)]
    for target in targets:
        chosen += sorted((m for m in marks if m["target"] == target),
                         key=lambda m: -m["delta"])[:2]
    figure, axis = plt.subplots(figsize=(8, 5), dpi=120)
    for m in chosen:
        run = next(r for r in m["runs"] if r["seed"] == seed)
        if run["run_dir"] is None or not (run["run_dir"] / "metrics.jsonl").exists():
            continue
        curve = eval_curve(run["run_dir"], run["samples_per_step"])
        label = "full tables" if m["method"] == FULL else f"{m['method']} at {m['target']:g}x"
        axis.plot([x for x, _ in curve], [y for _, y in curve], marker=".", label=label,
                  color="black" if m["method"] == FULL else None)
    axis.set_xlabel("training samples")
    axis.set_ylabel(f"eval AUC (seed {seed})")
    axis.set_title("eval AUC during training (experiment=tradeoff)")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return chosen


START, END = "<!-- results: start -->", "<!-- results: end -->"


def write_table(path: Path, table: str) -> None:
    """Put the table between the page's result markers (the page's prose stays), or write a
    page of its own when the file has no markers."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = f"{before}{START}\n{table}{END}{after}"
    else:
        text = f"{START}\n{table}{END}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="+",
                        help="sweep folders (searched for results.csv) or results.csv files")
    parser.add_argument("--png", type=Path, default=Path("docs/tradeoff.png"))
    parser.add_argument("--curves-png", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    marks = summarise(load_points(args.sweeps))
    plot(marks, args.png)
    table = markdown(marks)
    if args.markdown:
        write_table(args.markdown, table)
    print(table)
    print(f"wrote {args.png}")
    if args.curves_png:
        plot_curves(marks, args.curves_png)
        print(f"wrote {args.curves_png}")


if __name__ == "__main__":
    main()
