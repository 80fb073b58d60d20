"""Every hashing method, sharded row-wise and table-wise on 2 gloo ranks, equals one process.

One spawn of 2 ranks runs two models (each mixes several methods, so every method and
combiner is covered) under both shardings; forward (each rank's own losses and logits) and
backward (every table row after 4 SGD steps) must match a single process fed the global batch. The same run checks
that hashing keeps TrainPipelineSparseDist's overlap: every collection is pipelined and every
id mapper runs as a pipelined postproc.
"""

from __future__ import annotations

import torch

from modules.hashing import group_tables
from tests.helpers import (
    TINY,
    compose_config,
    full_tables,
    gather_outputs,
    run_ranks,
    train_sharded,
    train_unsharded,
)
from train.build import feature_groups
from train.data import planted_data
from train.frequency_counts import count_frequent_ids, save_frequency_file

SHARDINGS = ["row_wise", "table_wise"]
STEPS = 4
BASE = [*TINY, "optim=sgd", "trainer.batch_size=8"]
MODELS = {
    # dot interaction: methods whose combined vector keeps the dim.
    "dlrm": [
        "+hashing.features.user_id={method: multi_hash, num_hashes: 2, importance_rows: 8}",
        "+hashing.features.user_interests={method: qr, combine: mult}",
        "+hashing.features.ad_id={method: frequency, num_frequent: 20}",
        "+hashing.features.advertiser_id={method: modulo}",
        "+hashing.features.site_id={method: hash}",
    ],
    # dcn: combiners that widen the vector, and QR by sum.
    "dcn": [
        "model=dcn", "model.dense_layer_sizes=[16,8]", "model.over_layer_sizes=[16,1]",
        "model.dcn_num_layers=1", "model.dcn_low_rank_dim=4",
        "+hashing.features.user_id={method: multi_hash, num_hashes: 3, combine: concat}",
        "+hashing.features.user_interests={method: qr, combine: concat}",
        "+hashing.features.ad_id={method: qr, combine: sum, q: 7}",
    ],
}


def overrides(model: str, frequency_file: str) -> list[str]:
    return [*BASE, *MODELS[model], f"hashing.frequency_file={frequency_file}"]


def write_frequency_file(path: str) -> None:
    config = compose_config([*BASE, "hashing.method=modulo"])
    data = planted_data(config, feature_groups(config.features, config.hashing))
    batches = [data.batch("train", rank, step)[0] for rank in range(2) for step in range(20)]
    save_frequency_file(path, count_frequent_ids(batches, 100), {})


def table_sizes(groups) -> dict[str, tuple[int, int]]:
    return {t.name: (t.num_embeddings, t.embedding_dim) for g in groups for t in group_tables(g)}


def sharded_worker(rank: int, world_size: int, frequency_file: str, out_path: str) -> None:
    results = {}
    for model in MODELS:
        for sharding in SHARDINGS:
            config = compose_config([*overrides(model, frequency_file), f"sharding={sharding}"])
            groups = feature_groups(config.features, config.hashing)
            job, pipeline, outputs = train_sharded(config, groups, rank, world_size, STEPS)
            results[(model, sharding)] = {
                "outputs": gather_outputs(outputs),
                "tables": full_tables(job.model, table_sizes(groups), rank),
                "types": sorted({t.sharding_type for t in job.placed}),
                # Private, but the only way to see what the pipeline decided to overlap.
                "pipelined": len(pipeline._pipelined_modules),
                "postprocs": len(pipeline._pipelined_postprocs),
                "groups": len(groups),
            }
    if rank == 0:
        torch.save(results, out_path)


def unsharded_reference(model: str, frequency_file: str, world_size: int) -> dict:
    config = compose_config([*overrides(model, frequency_file), "sharding=table_wise"])
    groups = feature_groups(config.features, config.hashing)
    reference = train_unsharded(config, groups, world_size, STEPS)
    methods = {f.hashing.method for g in groups for f in g.features}
    return {**reference, "methods": methods}


def test_every_hashing_method_sharded_matches_single_process(tmp_path):
    frequency_file = str(tmp_path / "frequencies.pt")
    write_frequency_file(frequency_file)
    out_path = tmp_path / "sharded.pt"
    run_ranks(sharded_worker, 2, frequency_file, str(out_path))
    sharded = torch.load(out_path, weights_only=False)
    covered, table_names = set(), set()
    for model in MODELS:
        reference = unsharded_reference(model, frequency_file, 2)
        covered |= reference["methods"]
        table_names |= set(reference["tables"])
        for sharding in SHARDINGS:
            result = sharded[(model, sharding)]
            assert result["types"] == [sharding]
            assert result["pipelined"] == result["groups"] == result["postprocs"]
            # Each rank's own losses and logits (not all-reduced) against its slice.
            for key, reference_key in (("losses", "rank_losses"), ("logits", "logits")):
                actual = result["outputs"][key]
                torch.testing.assert_close(
                    actual, reference[reference_key].to(actual.dtype),
                    atol=1e-5, rtol=1e-5, msg=f"{model} {sharding}: per-rank {key} differ",
                )
            assert set(result["tables"]) == set(reference["tables"])
            for name, table in reference["tables"].items():
                torch.testing.assert_close(
                    result["tables"][name], table, atol=1e-5, rtol=1e-5,
                    msg=lambda m, s=sharding, n=name: f"{model} {s}: table {n} differs: {m}",
                )
    assert covered == {"none", "modulo", "hash", "multi_hash", "qr", "frequency"}
    # The expanded layouts really exist as ordinary tables.
    assert {"user_id_weights", "user_interests_q", "user_interests_r", "ad_id_q", "ad_id_r"} <= (
        table_names
    )
