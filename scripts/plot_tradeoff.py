"""Plot eval AUC against embedding bytes, one curve per hashing method, from a sweep.

    python scripts/plot_tradeoff.py multirun/tradeoff --png docs/tradeoff.png --markdown docs/tradeoff.md

Reads the sweep's results table (``<sweep dir>/results.csv``, written when the sweep ends by
train/sweep_results.py; a CSV path works too): each completed point's method (its ``hashing``
override, else the default ``hash``), compression ratio (``hashing.compression_ratio``),
bytes, eval AUC and Bayes AUC. Draws the Bayes-optimal AUC of the planted data as a line, and
writes the picture and a Markdown table of the same numbers.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

LABELS = {"default": "hash", "modulo": "modulo", "multi_hash": "multi_hash (k=2)",
          "qr": "qr (mult)", "frequency": "frequency",
          "managed": "managed (MCH)"}
RESULTS_FILE = "results.csv"  # train.sweep_results.RESULTS_FILE (this script needs no torch)


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def load_points(sweep: Path) -> list[dict]:
    """The completed points of a results table (a file, or a sweep dir holding results.csv)."""
    path = sweep / RESULTS_FILE if sweep.is_dir() else sweep
    if not path.exists():
        raise SystemExit(f"no {path}: run the sweep to its end (python -m train -m ...) first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "hashing.compression_ratio" not in rows[0]:
        raise SystemExit(f"{path}: the sweep did not set hashing.compression_ratio")
    points = []
    for row in rows:
        if row["status"] != "completed":
            print(f"skipping point {row['job_num']} ({row['status']}): {row['overrides']}")
            continue
        hashed = _number(row.get("embedding_bytes_hashed", ""))
        points.append({
            "method": row.get("hashing") or "default",
            "ratio": float(row["hashing.compression_ratio"]),
            # The hashing report's bytes: parameters + optimizer state, plus a managed
            # table's map (32 B per row), which the plan's table bytes leave out.
            "embedding_bytes": hashed if hashed is not None else float(row["embedding_bytes"]),
            "eval_auc": float(row["eval_auc"]),
            "bayes_auc": float(row["eval_bayes_auc"]),
            "samples_per_sec": _number(row.get("samples_per_sec", "")),
            "collisions": {
                key.split("/", 1)[1]: float(value)
                for key, value in row.items()
                if key.startswith("collision_rate/") and value != ""
            },
        })
    if not points:
        raise SystemExit(f"no completed point in {path}")
    return points


def markdown(points: list[dict]) -> str:
    lines = [
        "| method | compression | embedding bytes | eval AUC | Bayes AUC | gap | user_id collisions (eval) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in sorted(points, key=lambda p: (p["method"], p["ratio"])):
        user = p["collisions"].get("user_id")
        lines.append(
            f"| {LABELS.get(p['method'], p['method'])} | {p['ratio']:g}x | "
            f"{p['embedding_bytes'] / 2**20:,.1f} MiB | {p['eval_auc']:.4f} | {p['bayes_auc']:.4f} | "
            f"{p['bayes_auc'] - p['eval_auc']:.4f} | "
            f"{'-' if user is None else f'{100 * user:.1f}%'} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        curves[p["method"]].append(p)
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, curve in sorted(curves.items()):
        curve.sort(key=lambda p: p["embedding_bytes"])
        axis.plot([p["embedding_bytes"] / 2**20 for p in curve], [p["eval_auc"] for p in curve],
                  marker="o", label=LABELS.get(method, method))
    bayes = sum(p["bayes_auc"] for p in points) / len(points)
    axis.axhline(bayes, color="black", linestyle="--", label=f"Bayes AUC {bayes:.4f}")
    axis.set_xscale("log")
    axis.set_xlabel("embedding bytes (parameters + optimizer state + managed maps), MiB")
    axis.set_ylabel("eval AUC")
    axis.set_title("hashing trade-off on planted data (compression 4x .. 256x)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="center right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory or its results.csv")
    parser.add_argument("--png", type=Path, default=Path("docs/tradeoff.png"))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    points = load_points(args.sweep)
    plot(points, args.png)
    table = markdown(points)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
