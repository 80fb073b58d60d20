"""Time DLRM's dot interaction, forward + backward, against TorchRec's InteractionArch.

    python scripts/bench_interaction.py --features 258 --dim 16 --batch 2048 --threads 1

Times ``modules/interaction.py`` (the features as group blocks of ``--group`` features, as the
model hands them over) and ``torchrec.models.dlrm.InteractionArch`` (per-feature tensors,
stacked) on the same random inputs, in float32 and under bf16 autocast, with a gradient
through the output. Each figure is the least CPU time of the calling thread over
``--repeats`` runs: with one thread (the default), all of the run's work, whatever else runs
on the machine (other jobs take the core away but do not add to it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchrec.models.dlrm import InteractionArch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modules.interaction import dot_interaction, pair_indices  # noqa: E402


def milliseconds(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        step()
        best = min(best, time.thread_time() - started)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=258)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--group", type=int, default=32, help="features per group block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, features, dim = args.batch, args.features, args.dim
    dense = torch.randn(batch, dim, requires_grad=True)
    values = torch.randn(batch, features * dim, requires_grad=True)
    bottom = torch.nn.Linear(dim, dim)  # so that the dense input has the autocast dtype
    indices = pair_indices(features)
    arch = InteractionArch(num_sparse_features=features)

    def fused(dense_out):
        return dot_interaction(dense_out, list(values.split(args.group * dim, dim=1)), indices)

    def reference(dense_out):
        return arch(dense_out, values.view(batch, features, dim))

    results = {}
    for precision in ("fp32", "bf16"):
        for name, interaction in (("hashrec", fused), ("InteractionArch", reference)):
            gradient = None

            def step():
                nonlocal gradient
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = interaction(bottom(dense))
                if gradient is None:
                    gradient = torch.randn_like(out)
                out.backward(gradient)

            results[f"{name}_{precision}_ms"] = milliseconds(step, args.repeats)
    print(json.dumps({**vars(args), **{k: round(v, 1) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
