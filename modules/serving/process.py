"""Set-up shared by the processes that score with an exported model (scripts/predict.py,
scripts/bench_export.py)."""

from __future__ import annotations

import argparse
import logging
import warnings

THREADS_HELP = "torch intra-op threads (default: torch's choice, one per core)"


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def prepare_scoring_process(threads: int | None) -> None:
    """Quiet TorchRec's tracing warnings and set torch's intra-op threads when asked."""
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    if threads:
        import torch

        # On a shared machine 1 thread can be far faster: OpenMP threads of one op wait
        # for each other when another job holds a core.
        torch.set_num_threads(threads)
