"""Count the most frequent raw IDs per feature over the training stream, for hashing=frequency.

    python scripts/count_frequencies.py [--steps 200] [--ranks 1] [--top 100000] [--out PATH] \
        [Hydra overrides of the job, e.g. features=default trainer.batch_size=1024]

Reads the same data the job trains on (the configured source, ranks 0..ranks-1, train steps
0..steps-1) and writes the file ``hashing.frequency_file`` of that config names (default
``frequencies/<features.name>.pt``) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from train.build import feature_groups  # noqa: E402
from train.config import register_configs  # noqa: E402
from train.data import build_data_source  # noqa: E402
from train.distributed import DistributedContext  # noqa: E402
from train.frequency_counts import count_frequent_ids, save_frequency_file  # noqa: E402
from train.run import to_config  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="train steps read per rank")
    parser.add_argument("--ranks", type=int, default=1, help="rank streams read (0..ranks-1)")
    parser.add_argument("--top", type=int, default=100_000, help="IDs kept per feature")
    parser.add_argument("--out", default=None, help="default: the config's hashing.frequency_file")
    args, overrides = parser.parse_known_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # The counts must not depend on a file that does not exist yet: modulo while counting.
        cfg = compose(config_name="config", overrides=[*overrides, "hashing.method=modulo",
                                                       "hashing.features={}"])
    config = to_config(cfg)
    out = args.out or f"frequencies/{config.features.name}.pt"
    groups = feature_groups(config.features)
    context = DistributedContext(0, args.ranks, 0, args.ranks, torch.device("cpu"), "gloo")
    source, _ = build_data_source(config, groups, context)
    batches = (
        batch
        for rank in range(args.ranks)
        for batch in source.train_batches(rank, args.ranks, 0, args.steps)
    )
    counted = count_frequent_ids(batches, args.top)
    meta = {"features": config.features.name, "steps": args.steps, "ranks": args.ranks,
            "batch_size": config.trainer.batch_size, "seed": config.trainer.seed,
            "samples": args.steps * args.ranks * config.trainer.batch_size}
    path = save_frequency_file(out, counted, meta)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.numel()}" for k, v in counted["ids"].items()))
    return path


if __name__ == "__main__":
    main()
