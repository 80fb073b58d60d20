"""Where a profiled training step's time goes, stage by stage, and how close it runs to the
machine's compute and memory limits.

Reads the Chrome traces ``trainer.profile=true`` writes (``train/profiling.py``) and gives each
microsecond of every profiled ``train_step`` range on the training thread to exactly one stage
(``STAGES``), so the stages add up to the profiled step time:

* the pipeline's phase ranges (TorchRec's ``## next_batch ##``, ``## start_sparse_data_dist N
  ##``, ``## forward N ##``, ``## backward N ##``, ``## optimizer N ##``...) give the stage;
* ranges inside a phase refine it (``REFINEMENTS``): in forward, a sharded collection's
  ``[lookup]`` is the embedding lookup, its ``[output_dist]`` and the pooled-embedding waits the
  output all-to-all, the wait for the IDs' all-to-all and the KJT assembly input distribution;
  in backward, fbgemm's fused backward (gradient and embedding optimizer in one kernel) is
  embedding backward, the gradients' all-to-all (or all-gather) output all-to-all;
* an op's self time (its time less its children's) goes to the stage of the innermost range
  around it that has one; time inside ``train_step`` but in no phase is ``other``.

The ID mapping (hashing, a pipelined postproc) runs inside the input distribution of the next
batch and is its own stage; ``input distribution`` is the rest of it.

What runs off the training thread is not in the split: the batch-making thread (data wait is
only the time the step waits for it) and gloo's own threads (an all-to-all started in one
phase and waited on in a later one costs only its wait).

Bounds: ``matmul_flops`` counts the dense arithmetic of the profiled steps from the shapes of
their matmul ops (mm, addmm, bmm, baddbmm: 2 M K N each, by dtype); ``embedding_bytes_per_
sample`` counts what a fused table-batched lookup moves (see there). Divided by the machine's
measured matmul FLOP/s and copy bandwidth they give the time a step would take at each limit;
over the measured step time, the share of the limit the job reaches.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from modules.features import FeatureGroupSpec
from modules.hashing import tables_with_features
from train.loop import STEP_RANGE

DATA = "data"
ID_MAPPING = "ID mapping"
INPUT_DIST = "input distribution"
LOOKUP = "embedding lookup"
OUTPUT_DIST = "output all-to-all"
DENSE_FORWARD = "dense forward"
EMBEDDING_BACKWARD = "embedding backward"
DENSE_BACKWARD = "dense backward"
OPTIMIZER = "optimizer"
OTHER = "other"
STAGES = (DATA, ID_MAPPING, INPUT_DIST, LOOKUP, OUTPUT_DIST, DENSE_FORWARD, EMBEDDING_BACKWARD,
          DENSE_BACKWARD, OPTIMIZER, OTHER)

# The pipeline's phase ranges (TrainPipelineSparseDist.progress) -> stage.
PHASES = (
    (("## next_batch", "## copy_batch_to_gpu", "## inplace_copy_batch_to_gpu",
      "## wait_for_batch"), DATA),
    (("## start_sparse_data_dist", "## wait_sparse_data_dist"), INPUT_DIST),
    (("## forward",), DENSE_FORWARD),
    (("## backward",), DENSE_BACKWARD),
    (("## zero_grad", "## optimizer"), OPTIMIZER),
)
_ALL_TO_ALL = ("All2All", "alltoall", "all_to_all", "ReduceScatter", "reduce_scatter",
               "AllGather", "all_gather", "allgather")
# Inside a stage, a range or op whose name holds a needle moves its time to another stage.
REFINEMENTS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    INPUT_DIST: ((("input_postproc",), ID_MAPPING),),
    DENSE_FORWARD: (
        (("input_postproc",), ID_MAPPING),
        (("[lookup]",), LOOKUP),
        (("[output_dist", "PooledEmbeddingsAwaitable", "EmbeddingBagCollectionAwaitable"),
         OUTPUT_DIST),
        (("KJTAllToAllTensorsAwaitable", "KJTListAwaitable", "runtime_forward_assemble_KJT",
          "[input_dist", "[splits_dist"), INPUT_DIST),
    ),
    DENSE_BACKWARD: (
        (("SplitLookupFunction", "split_embedding_backward"), EMBEDDING_BACKWARD),
        (_ALL_TO_ALL, OUTPUT_DIST),
    ),
}

# Matmul ops whose FLOPs count (leaves: linear and matmul dispatch to these), with the
# positions of their two matrix operands in the recorded inputs.
_MATMULS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1),
            "aten::baddbmm": (1, 2)}
_DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "double": "fp64"}


def load_events(path: Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace."""
    return [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X"]


def step_events(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """The ``train_step`` ranges and every complete event on their thread inside them, in
    start order (an enclosing event before the events it holds)."""
    steps = sorted((e for e in events if e["name"] == STEP_RANGE), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"no {STEP_RANGE!r} range in the trace: was it made by trainer.profile?")
    tid = steps[0]["tid"]
    inside = [
        e for e in events
        if e["tid"] == tid and e["name"] != STEP_RANGE
        and any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] for s in steps)
    ]
    return steps, sorted(inside, key=lambda e: (e["ts"], -e["dur"]))


def stage_of(names: Iterable[str]) -> str:
    """The stage of an instant inside ``train_step``, from the names of the events around it,
    outermost first."""
    stage = OTHER
    for name in names:
        if stage == OTHER:
            for needles, phase in PHASES:
                if name.startswith(needles):
                    stage = phase
                    break
            continue
        for needles, refined in REFINEMENTS.get(stage, ()):
            if any(needle in name for needle in needles):
                stage = refined
                break
    return stage


def stage_milliseconds(steps: list[dict], inside: list[dict]) -> dict[str, float]:
    """Milliseconds per profiled step in each stage; they add up to the mean step time."""
    totals: dict[str, float] = defaultdict(float)
    children: dict[int, float] = defaultdict(float)
    stack: list[dict] = []
    placed: list[tuple[dict, str]] = []
    for event in inside:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
            stack.pop()
        # A child that outlasts its parent (clock rounding) counts only up to the parent's end.
        if stack:
            end = min(event["ts"] + event["dur"], stack[-1]["ts"] + stack[-1]["dur"])
            children[id(stack[-1])] += max(0.0, end - event["ts"])
        stack.append(event)
        placed.append((event, stage_of(e["name"] for e in stack)))
    covered = 0.0
    for event, stage in placed:
        self_time = max(0.0, event["dur"] - children[id(event)])
        totals[stage] += self_time
    # Top-level events (no parent inside the step) cover the step; the rest is the step's own.
    stack = []
    for event in inside:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
            stack.pop()
        if not stack:
            covered += event["dur"]
        stack.append(event)
    totals[OTHER] += max(0.0, sum(s["dur"] for s in steps) - covered)
    return {stage: totals.get(stage, 0.0) / 1000 / len(steps) for stage in STAGES}


def _flops(name: str, dims: list) -> int:
    left, right = (dims[i] for i in _MATMULS[name])
    batch = left[0] if len(left) == 3 else 1
    rows, inner = left[-2], left[-1]
    return 2 * batch * rows * inner * right[-1]


def matmul_flops(steps: list[dict], inside: list[dict]) -> dict[str, float]:
    """Dense arithmetic per profiled step by operand dtype ("fp32", "bf16"...): 2 M K N per
    matmul (times the batch for bmm). Needs a trace recorded with shapes (trainer.profile
    records them); a matmul inside another counted one is not counted twice."""
    totals: dict[str, float] = defaultdict(float)
    counted_until = -1.0
    for event in inside:
        if event["name"] not in _MATMULS or event["ts"] < counted_until:
            continue
        args = event.get("args", {})
        dims, types = args.get("Input Dims"), args.get("Input type")
        if not dims or not types:
            raise ValueError(f"{event['name']} has no recorded shapes: profile with shapes")
        operand = types[_MATMULS[event["name"]][0]]
        totals[_DTYPES.get(operand, operand)] += _flops(event["name"], dims)
        counted_until = event["ts"] + event["dur"]
    return {dtype: value / len(steps) for dtype, value in totals.items()}


# Bytes a fused table-batched lookup with row-wise Adagrad touches per looked-up ID and per
# pooled bag, as multiples of the embedding dim D (float32 values); see embedding_bytes_per_
# sample.
OPTIMIZER_STATE_VALUES = {"sgd": lambda dim: 0, "rowwise_adagrad": lambda dim: 1,
                          "adagrad": lambda dim: dim, "adam": lambda dim: 2 * dim}


def lookups_per_sample(groups: list[FeatureGroupSpec]) -> list[tuple[int, int]]:
    """(IDs per sample, dim) of every key the collections pool: a feature's own key, each of
    its multi-hash probes and its importance key, its QR parts, a shared table's keys."""
    lookups = []
    for group in groups:
        ids_per_sample = {feature.name: feature.ids_per_sample for feature in group.features}
        for table, _ in tables_with_features(group):
            # A key is its feature's name, or the name, "#" and the probe or part.
            lookups += [(ids_per_sample[key.split("#")[0]], table.embedding_dim)
                        for key in table.feature_names]
    return lookups


def embedding_bytes_per_sample(
    lookups: Iterable[tuple[int, int]], optimizer: str, value_bytes: int = 4
) -> int:
    """Bytes the embedding lookup, its backward and the fused optimizer move per sample.

    ``lookups``: (IDs per sample, dim) per mapped key (each key is one pooled bag). Forward
    reads each ID's row and writes the bag's pooled vector; backward reads the pooled
    gradient, reads and writes each ID's row and its optimizer state (an upper bound: an ID
    met twice in a batch is updated once). The memory system cannot move these faster than
    it copies, so bytes / copy bandwidth is the step's floor from the lookups alone.
    """
    state = OPTIMIZER_STATE_VALUES[optimizer]
    values = 0
    for ids, dim in lookups:
        values += ids * dim  # forward: read each ID's row
        values += 2 * dim  # forward: write the pooled bag; backward: read its gradient
        values += ids * (2 * dim + 2 * state(dim))  # backward: read + write row and state
    return values * value_bytes


def bound_shares(
    step_seconds: float,
    flops_per_step: dict[str, float],
    flops_per_second: dict[str, float],
    embedding_bytes_per_step: float,
    copy_bytes_per_second: float,
) -> dict[str, float]:
    """The step's time at the compute limit and at the memory limit, and each as a share of
    the measured ``step_seconds`` (1.0 = the step runs at that limit)."""
    compute_seconds = sum(
        flops / flops_per_second[dtype] for dtype, flops in flops_per_step.items()
    )
    memory_seconds = embedding_bytes_per_step / copy_bytes_per_second
    return {
        "compute_bound_seconds": compute_seconds,
        "memory_bound_seconds": memory_seconds,
        "compute_bound_share": compute_seconds / step_seconds,
        "memory_bound_share": memory_seconds / step_seconds,
    }


def trace_breakdown(path: Path) -> dict:
    """One rank's trace: stage ms per step, the profiled step ms and matmul FLOPs per step."""
    steps, inside = step_events(load_events(path))
    return {
        "stage_ms": stage_milliseconds(steps, inside),
        "profiled_step_ms": sum(s["dur"] for s in steps) / 1000 / len(steps),
        "flops_per_step": matmul_flops(steps, inside),
        "num_steps": len(steps),
    }

