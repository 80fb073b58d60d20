"""Stream raw Criteo files (plain or .gz) into memory-mapped numpy shards.

    python scripts/preprocess_criteo.py OUT_DIR/train day_0.gz day_1.gz ... [--workers 4]
    python scripts/preprocess_criteo.py OUT_DIR/val day_23 --line-fraction 0:0.5
    python scripts/preprocess_criteo.py OUT_DIR/test day_23 --line-fraction 0.5:1

Each input is cut into tasks (a byte range of at most --task-bytes of a plain file, or a whole
.gz file); worker processes parse tasks in blocks of --rows-per-shard rows, so memory stays
bounded whatever the input size. A finished task leaves a small ``*.done.json`` marker: rerun
the same command after an interruption and finished tasks are skipped. When every task is
done, ``manifest.json`` lists the shards in input order; loaders read only through it.

Numpy shards rather than Parquet: a batch is then a slice of memory-mapped arrays with no
decompression or decoding at read time (docs/performance.md gives the measured read rate).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.tabular import BadRowError  # noqa: E402
from modules.criteo_preprocess import preprocess  # noqa: E402


def _fraction(text: str) -> tuple[float, float]:
    lo, hi = (float(part) for part in text.split(":"))
    if not 0.0 <= lo < hi <= 1.0:
        raise argparse.ArgumentTypeError(f"--line-fraction wants LO:HI with 0 <= LO < HI <= 1, got {text}")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output directory of one split")
    parser.add_argument("inputs", type=Path, nargs="+", help="raw Criteo files (plain or .gz)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rows-per-shard", type=int, default=250_000)
    parser.add_argument("--task-bytes", type=int, default=64 << 20)
    parser.add_argument("--on-bad-row", choices=("fail", "skip"), default="fail")
    parser.add_argument("--line-fraction", type=_fraction, default=(0.0, 1.0),
                        help="keep only this fraction of each input's lines, e.g. 0:0.5")
    args = parser.parse_args(argv)
    try:
        manifest = preprocess(
            args.inputs, args.out_dir, args.workers, args.rows_per_shard,
            args.on_bad_row == "skip", args.task_bytes, args.line_fraction,
        )
    except (BadRowError, FileNotFoundError) as error:
        print(f"preprocess_criteo: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {manifest.rows:,} rows in {len(manifest.shards)} shards, "
          f"{manifest.skipped_rows:,} bad rows skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
