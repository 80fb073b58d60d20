"""Table bytes, eval AUC and scoring speed of a run exported in fp32, fp16 and int8.

    python scripts/bench_export.py <run dir> [--batch-sizes 256 4096] [--batches 30]

Exports the run's latest checkpoint in each precision (into a temporary folder), scores the
run's eval split (every rank's eval batches, as its evaluation saw them) and reports each
file's table bytes and AUC next to the run's eval_auc; then times the fp32, fp16 and int8
models on batches of the run's data at each batch size: samples/s and per-batch latency
p50/p99 of the model call (after 3 warm-up calls), wall-clock and the process CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.serving.process import add_threads_option, prepare_scoring_process  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per size")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    prepare_scoring_process(args.threads)
    import numpy as np
    import torch

    from modules.metrics import auc
    from modules.serving.inputs import batch_inputs
    from modules.serving.schema import load_exported
    from train.data import build_data_source
    from train.distributed import DistributedContext
    from train.export import _groups, export, find_checkpoint, load_run_config

    _, checkpoint = find_checkpoint(args.run_dir)
    meta = json.loads((checkpoint / "meta.json").read_text())
    world_size = int(meta["world_size"])
    config, _ = load_run_config(args.run_dir)
    groups = _groups(config, args.run_dir)
    summary = json.loads((args.run_dir / "summary.json").read_text())
    context = DistributedContext(0, world_size, 0, world_size, torch.device("cpu"), "gloo")
    source, _ = build_data_source(config, groups, context)
    eval_batches = [b for rank in range(world_size) for b in source.eval_batches(rank, world_size)]
    labels = torch.cat([b.labels for b in eval_batches])
    print(f"run {args.run_dir}: eval_auc {summary['eval_auc']:.4f} on {labels.numel():,} rows, "
          f"torch threads {torch.get_num_threads()}")
    print("| precision | table bytes | file bytes | eval AUC | AUC - fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        base_auc = None
        for precision in ("fp32", "fp16", "int8"):
            exported = export(args.run_dir, Path(folder) / f"{precision}.pt", precision)
            model, _ = load_exported(str(exported.path))
            models[precision] = model
            with torch.inference_mode():
                scores = torch.cat([model(*batch_inputs(b)) for b in eval_batches])
            value = auc(scores, labels)
            base_auc = value if base_auc is None else base_auc
            print(f"| {precision} | {exported.table_bytes:,} | {exported.file_bytes:,} | "
                  f"{value:.4f} | {value - base_auc:+.4f} |")
    print("\n| precision | batch | samples/s | p50 ms | p99 ms | CPU ms per batch (p50) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch_size in args.batch_sizes:
        sized = replace(config, trainer=replace(config.trainer, batch_size=batch_size))
        data, _ = build_data_source(sized, groups, context)
        batches = []
        for batch in data.train_batches(0, world_size, 0, args.batches):
            batches.append(batch_inputs(batch))
        for precision, model in models.items():
            times, cpu_times = [], []
            with torch.inference_mode():
                for _ in range(3):
                    model(*batches[0])
                for inputs in batches:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    model(*inputs)
                    times.append(time.perf_counter() - started)
                    cpu_times.append(time.process_time() - cpu_started)
            seconds = np.asarray(times)
            rate = batch_size * len(times) / seconds.sum()
            print(f"| {precision} | {batch_size:,} | {rate:,.0f} | "
                  f"{np.quantile(seconds, 0.5) * 1e3:.2f} | "
                  f"{np.quantile(seconds, 0.99) * 1e3:.2f} | "
                  f"{np.median(cpu_times) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
