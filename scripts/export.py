"""Export a trained run as one self-contained TorchScript file for serving.

    python scripts/export.py <run dir or checkpoint dir> <out file> [--precision fp32|fp16|int8]

Reads a checkpoint of any world size and sharding (a run directory: its latest intact one),
gathers it into one unsharded model on CPU, and writes the tables (in the chosen precision),
the dense part, every feature's ID mapping with its state, and the feature schema. Loading the
file needs torch and fbgemm, not hashrec (docs/serving.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("out", type=Path, help="the file to write")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                        help="how the tables are stored (default fp32)")
    args = parser.parse_args(argv)
    # Tracing and scripting TorchRec modules warns about internals; none concern the user.
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    from train.export import ExportError, export

    try:
        exported = export(args.source, args.out, args.precision)
    except (ExportError, OSError) as error:
        print(f"hashrec: error: {error}", file=sys.stderr)
        return 2
    print(
        f"exported {exported.checkpoint} (step {exported.step}, {exported.world_size} "
        f"rank(s)) to {exported.path}: {exported.file_bytes:,} bytes, tables "
        f"{exported.table_bytes:,} bytes in {args.precision}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
