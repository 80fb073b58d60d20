"""Draw where a profiled training step's time goes, from the traces trainer.profile=true writes.

    python scripts/plot_profile.py <run dir>/profile --png docs/profile_reference_shape.png

Reads every ``rank_<r>.pt.trace.json`` of the folder (Chrome traces from torch.profiler) and
draws two panels: a timeline of each rank's profiled ``train_step`` ranges split into the
phases TorchRec's pipeline marks (forward, backward, optimizer, input distribution...), and the
time inside those steps by kind of work (self time of every op and range on the step's thread,
given the kind of its own name or of the innermost range around it that has one). It prints the
same split as a table.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

STEP_RANGE = "train_step"  # train.loop.STEP_RANGE (not imported: keeps this script torch-free)
# Kind of work by name (first match wins), checked on an event and then on its enclosing ranges.
KINDS = [
    ("ID mapping (hashing)", ("input_postproc",)),
    ("embedding lookup / backward + fused optimizer (fbgemm)",
     ("fbgemm::split_embedding", "SplitLookupFunction", "split_embedding_codegen")),
    ("all-to-all and its waits",
     ("All2All", "all_to_all", "alltoall", "Awaitable wait", "output_dist", "splits_dist",
      "all2all", "wait_sparse_data_dist", "c10d", "gloo")),
    ("dot interaction", ("DotInteraction",)),
    ("MLPs (matmul)", ("addmm", "Addmm", "aten::mm", "aten::linear", "MmBackward")),
    ("dense optimizer", ("Optimizer.step", "## optimizer")),
    ("loss", ("binary_cross_entropy", "BinaryCrossEntropy")),
]
OTHER = "other (framework, copies, small ops)"
PHASE = re.compile(r"^## (.*?)(?: \d+)? ##$")


def kind_of(name: str) -> str | None:
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return None


def load(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]


def step_events(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """The train_step ranges and every complete event on their thread inside them."""
    steps = sorted((e for e in events if e["name"] == STEP_RANGE), key=lambda e: e["ts"])
    if not steps:
        raise SystemExit(f"no {STEP_RANGE!r} range in the trace: was it made by trainer.profile?")
    tid = steps[0]["tid"]
    inside = [
        e for e in events
        if e["tid"] == tid and e["name"] != STEP_RANGE
        and any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] for s in steps)
    ]
    return steps, sorted(inside, key=lambda e: (e["ts"], -e["dur"]))


def time_by_kind(inside: list[dict]) -> dict[str, float]:
    """Self time (its duration less its children's) of every event, summed by kind, in ms."""
    totals: dict[str, float] = defaultdict(float)
    stack: list[dict] = []
    selfs: list[tuple[dict, list[dict]]] = []
    for event in inside:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
            stack.pop()
        if stack:
            stack[-1]["_children"] = stack[-1].get("_children", 0.0) + event["dur"]
        selfs.append((event, list(stack)))
        stack.append(event)
    for event, parents in selfs:
        kind = kind_of(event["name"])
        for parent in reversed(parents):
            if kind is not None:
                break
            kind = kind_of(parent["name"])
        totals[kind or OTHER] += (event["dur"] - event.get("_children", 0.0)) / 1000
    return dict(totals)


def phases(steps: list[dict], inside: list[dict]) -> list[tuple[str, float, float]]:
    """(phase, start ms, length ms) of the pipeline's top ranges, from the first step's start."""
    origin = steps[0]["ts"]
    out = []
    for event in inside:
        match = PHASE.match(event["name"])
        if match and not any(
            other is not event and other["ts"] <= event["ts"]
            and event["ts"] + event["dur"] <= other["ts"] + other["dur"]
            and PHASE.match(other["name"]) for other in inside
        ):
            out.append((match.group(1), (event["ts"] - origin) / 1000, event["dur"] / 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile_dir", type=Path)
    parser.add_argument("--png", type=Path, default=Path("profile.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    paths = sorted(args.profile_dir.glob("rank_*.pt.trace.json"),
                   key=lambda p: int(p.name.split("_")[1].split(".")[0]))
    if not paths:
        raise SystemExit(f"no rank_<r>.pt.trace.json in {args.profile_dir}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (timeline, bars) = plt.subplots(
        2, 1, figsize=(10, 3.2 + 1.4 * len(paths)), dpi=110,
        gridspec_kw={"height_ratios": [len(paths), len(paths) + 1.5]},
    )
    colors: dict[str, str] = {}
    palette = plt.get_cmap("tab10").colors
    per_rank: list[dict[str, float]] = []
    for row, path in enumerate(paths):
        steps, inside = step_events(load(path))
        per_rank.append({k: v / len(steps) for k, v in time_by_kind(inside).items()})
        for name, start, length in phases(steps, inside):
            color = colors.setdefault(name, palette[len(colors) % len(palette)])
            timeline.barh(row, length, left=start, color=color, edgecolor="white", linewidth=0.3)
        origin = steps[0]["ts"]
        for step in steps:
            timeline.plot([(step["ts"] - origin) / 1000] * 2, [row - 0.45, row + 0.45],
                          color="black", linewidth=0.8)
    timeline.set_yticks(range(len(paths)), [f"rank {i}" for i in range(len(paths))])
    timeline.invert_yaxis()
    timeline.set_xlabel("ms from the first profiled step's start (black ticks: each step's start)")
    timeline.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()],
                    labels=list(colors), fontsize=7, ncol=4, loc="upper center",
                    bbox_to_anchor=(0.5, -0.35), frameon=False)
    timeline.set_title(args.title or f"{args.profile_dir}", fontsize=9)

    kinds = [kind for kind, _ in KINDS] + [OTHER]
    height = 0.8 / len(per_rank)
    for rank, totals in enumerate(per_rank):
        values = [totals.get(kind, 0.0) for kind in kinds]
        bars.barh([i + rank * height for i in range(len(kinds))], values, height=height,
                  label=f"rank {rank}")
    bars.set_yticks([i + 0.4 - height / 2 for i in range(len(kinds))], kinds, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("ms per step (self time on the training thread)")
    bars.legend(fontsize=8)
    bars.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.png)

    ranks = range(len(per_rank))
    print("| kind of work | " + " | ".join(f"rank {r} ms/step" for r in ranks) + " |")
    print("| --- |" + " ---: |" * len(per_rank))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{t.get(kind, 0.0):.1f}" for t in per_rank) + " |")
    print("| **step** | " + " | ".join(f"{sum(t.values()):.1f}" for t in per_rank) + " |")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
