"""Score raw rows with an exported model, streaming, into a Parquet file.

    python scripts/predict.py <exported file> <input> <out.parquet> [--batch-size N]
        [--on-bad-row fail|skip] [--device cpu|cuda]

<input>: a Criteo text file (.tsv/.txt/.gz) or folder of them, a preprocessed Criteo folder
(scripts/preprocess_criteo.py), or a Parquet file or folder in the schema the model was
trained on. The output has one ``score`` (click probability) per input row, in input order,
and ``label`` when the input has labels; with labels it prints AUC, NE and log loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.serving.process import add_threads_option, prepare_scoring_process  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="file written by scripts/export.py")
    parser.add_argument("input", type=Path, help="rows to score (file or folder)")
    parser.add_argument("out", type=Path, help="output Parquet file")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--on-bad-row", default="fail", choices=("fail", "skip"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    prepare_scoring_process(args.threads)
    import torch

    from modules.serving.predict import predict

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.model.is_file():
        print(f"hashrec: error: {args.model}: no such exported model file", file=sys.stderr)
        return 2
    try:
        result = predict(args.model, args.input, args.out, args.batch_size, args.on_bad_row, device)
    except (ValueError, OSError, RuntimeError) as error:  # BadRowError is a ValueError
        print(f"hashrec: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    rate = result.rows / max(result.seconds, 1e-9)
    print(f"scored {result.rows:,} rows in {result.seconds:.2f} s ({rate:,.0f} rows/s) "
          f"on {device} -> {args.out}")
    if result.skipped:
        print(f"skipped {result.skipped:,} bad rows (--on-bad-row skip)")
    if result.batch_seconds:
        print(f"model time per batch of up to {args.batch_size:,}: p50 "
              f"{result.latency_ms(0.5):.2f} ms  p99 {result.latency_ms(0.99):.2f} ms  "
              f"({len(result.batch_seconds):,} batches)")
    if result.metrics is not None:
        m = result.metrics
        print(f"auc {m['auc']:.4f}  ne {m['ne']:.4f}  logloss {m['log_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
