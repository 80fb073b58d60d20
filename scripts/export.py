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
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the file as a model artifact of the run's W&B run "
                             "(logged by default unless the run had logger.mode=disabled)")
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
    if not args.no_wandb:
        _log_artifact(exported, args.precision)
    return 0


def _log_artifact(exported, precision: str) -> None:
    """The file as a ``model`` artifact of the run's W&B run (in the run's logger mode), so a
    W&B user finds the model beside the run that trained it."""
    from train.export import load_run_config
    from train.wandb_logger import log_exported_model

    run_dir = exported.checkpoint.parent.parent  # <run dir>/checkpoints/step_<N>
    config, _ = load_run_config(run_dir)
    metadata = {"precision": precision, "step": exported.step,
                "checkpoint": str(exported.checkpoint), "world_size": exported.world_size}
    directory = log_exported_model(config.logger, run_dir, exported.path, metadata)
    if directory is not None:
        print(f"W&B: logged as a model artifact of the run ({directory})")


if __name__ == "__main__":
    sys.exit(main())
