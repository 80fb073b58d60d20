"""How fast each data source makes batches on one thread, to compare with training speed.

    python scripts/data_throughput.py [--batches 50]

Sources: planted synthetic data for the default job and the reference shape (batch as each
job uses it), and the real Criteo sample read from preprocessed, memory-mapped shards and from
Parquet (both written to a temporary folder first; the sample is small, so it is read in
several passes). One thread, as one rank's batch-making competes with its training step.
Prints one JSON line per source with samples/s.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.criteo_preprocess import preprocess  # noqa: E402
from modules.data_sources import CriteoSource, ParquetSource  # noqa: E402
from train.build import feature_groups  # noqa: E402
from train.data import planted_data  # noqa: E402
from train.run import to_config  # noqa: E402

SAMPLE = REPO / "data" / "criteo_sample"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def rate(batches, batch_size: int) -> float:
    next(batches)  # first batch: caches, lazy set-up
    count = 0
    started = time.perf_counter()
    for _ in batches:
        count += 1
    return count * batch_size / (time.perf_counter() - started)


def planted(overrides: list[str], num_batches: int) -> float:
    config = compose(overrides)
    data = planted_data(config, feature_groups(config.features, config.hashing))
    return rate((data.batch("train", 0, step)[0] for step in range(num_batches + 1)),
                config.trainer.batch_size)


def write_parquet(rows: list[list[str]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"label": pa.array([int(r[0]) for r in rows], pa.int64())}
    for i in range(13):
        table[f"I{i + 1}"] = pa.array([math.log1p(max(int(r[1 + i]), 0)) if r[1 + i] else 0.0 for r in rows])
    for i in range(26):
        table[f"C{i + 1}"] = pa.array([r[14 + i] or None for r in rows], pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path, row_group_size=2048)


def main() -> None:
    torch.set_num_threads(1)
    num_batches = int(sys.argv[sys.argv.index("--batches") + 1]) if "--batches" in sys.argv else 50
    results = {
        "planted_default": planted([], num_batches),
        "planted_reference_shape": planted(["experiment=reference_shape"], num_batches),
    }
    if SAMPLE.exists():
        config = compose(["experiment=criteo_sample", "trainer.batch_size=1024"])
        groups = feature_groups(config.features, config.hashing)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            preprocess([SAMPLE / "train.tsv"], root / "train", progress=False)
            preprocess([SAMPLE / "dev.tsv"], root / "dev", progress=False)
            source = CriteoSource(root / "train", root / "dev", groups, 1024, 13)
            results["criteo_shards"] = rate(source.train_batches(0, 1, 0, num_batches + 1), 1024)
            rows = [l.split("\t") for l in (SAMPLE / "train.tsv").read_text().splitlines()]
            write_parquet(rows, root / "pq" / "train" / "part-0.parquet")
            write_parquet(rows[:1000], root / "pq" / "eval" / "part-0.parquet")
            parquet = ParquetSource(root / "pq" / "train", root / "pq" / "eval", groups, 1024, "label",
                                    [f"I{i}" for i in range(1, 14)], [f"C{i}" for i in range(1, 27)])
            results["parquet_string_ids"] = rate(parquet.train_batches(0, 1, 0, num_batches + 1), 1024)
    for source, samples_per_sec in results.items():
        print(json.dumps({"source": source, "samples_per_sec_one_thread": samples_per_sec}))


if __name__ == "__main__":
    main()
