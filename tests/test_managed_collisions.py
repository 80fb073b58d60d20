"""Method managed: TorchRec's MCH maps, sharded row-wise over 2 gloo ranks, trained on CPU.

Unlike every other method, a managed table's ID -> row map is state that training changes,
and TorchRec shards it by ID range (each rank keeps its own map over its own rows), so a
2-rank run does not equal one process with one map. It equals one process with two maps split
the same way (tests/managed_reference.py): each rank's own losses and logits of every step
(never all-reduced), every table row after training, and each rank's map (hashed ID -> row)
must match that process fed the global batch. Beside that, the tests check what must hold of
the maps themselves: each admitted ID lives in exactly one rank's map with a row of its own
inside that rank's rows; every ID trained on is admitted when rows suffice; the rows an
admission takes over are reset (the CPU reset that fbgemm lacks); the report counts rows from
the live maps; the pipeline still overlaps the managed collection; and a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from modules.hashing import group_tables
from modules.id_mapping import HashingIdMapper
from modules.managed_collisions import MANAGED_INPUT_SPACE, admitted, mch_modules
from tests.helpers import (
    TINY,
    compose_config,
    full_tables,
    gather_outputs,
    run_ranks,
    run_train,
    train_sharded,
    train_unsharded,
)
from tests.managed_reference import RangeSplitManagedCollection, shard_maps
from train.build import feature_groups
from train.data import planted_data
from train.hashing import hashing_report
from train.managed_sharding import ShardedManagedCollection, reset_rows

STEPS = 6
# user_id: rows to spare (every ID trained on fits); ad_id: 8 rows, 4 per rank, so admissions
# evict. Both groups keep a hashed feature beside the managed one. Default optimizer
# (row-wise Adagrad) and sharding (auto: the planner places the plain tables).
OVERRIDES = [
    *TINY,
    "features.groups.user.features.user_id.num_embeddings=1024",
    "+hashing.features.user_id=managed",
    "+hashing.features.ad_id=managed",
    "features.groups.ad.features.ad_id.num_embeddings=8",
    "hashing.eviction_interval=1",
]
# Per-rank losses, logits and table values against the reference: a few times the float32
# noise measured on 2026-11-30 (at most 1.5e-7 over these 6 steps; the same bound as row-wise
# Adagrad's in test_sharding_equivalence.py). The maps must be equal.
ATOL = 1e-6


def replayable_init(weight: torch.Tensor) -> torch.Tensor:
    """Fresh values for the rows an admission takes over, during the comparison. TorchRec's
    init_fn draws them from each rank's global RNG, which one process cannot replay for two
    ranks; this one depends only on the row's old values, so both runs reset alike."""
    return weight * -0.5


def use_replayable_init(model: torch.nn.Module) -> dict:
    """Swap every sharded managed table's init_fn for replayable_init; returns the old ones."""
    replaced = {}
    for module in model.modules():
        if isinstance(module, ShardedManagedCollection):
            for name, config in module._embedding_module._table_name_to_config.items():
                replaced[name] = (config, config.init_fn)
                config.init_fn = replayable_init
    return replaced


def map_entries(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(hashed IDs, their rows) held in this rank's shard of a map."""
    ids = module._mch_sorted_raw_ids
    used = ids != torch.iinfo(torch.int64).max
    return ids[used].clone(), module._mch_remapped_ids_mapping[used].clone()


def worker(rank: int, world_size: int, out_path: str) -> None:
    config = compose_config(OVERRIDES)
    groups = feature_groups(config.features, config.hashing)
    replaced: dict = {}
    job, pipeline, outputs = train_sharded(
        config, groups, rank, world_size, STEPS,
        prepare=lambda job: replaced.update(use_replayable_init(job.model)),
    )
    assert set(replaced) == {"user_id", "ad_id"}
    for table_config, init_fn in replaced.values():
        table_config.init_fn = init_fn  # TorchRec's own again, for the reset check below
    maps = mch_modules(job.model)
    sizes = {t.name: (t.num_embeddings, t.embedding_dim) for g in groups for t in group_tables(g)}
    result = {
        "outputs": gather_outputs(outputs),
        "tables": full_tables(job.model, sizes, rank),
        "types": {t.name: t.sharding_type for t in job.placed},
        "pipelined": len(pipeline._pipelined_modules),
        "postprocs": len(pipeline._pipelined_postprocs),
        "maps": {name: map_entries(module) for name, module in maps.items()},
        "row_range": {
            name: (module._output_global_offset, module._output_global_offset + module._zch_size)
            for name, module in maps.items()
        },
    }
    # The hashed user_id values this rank trained on.
    user_group = next(g for g in groups if g.name == "user")
    mapper = HashingIdMapper(list(user_group.features))
    data = planted_data(config, groups)
    trained = torch.cat(
        [data.batch("train", rank, step)[0].sparse_features["user"]["user_id"].values()
         for step in range(STEPS)]
    )
    result["trained_user_ids"] = mapper.feature_rows("user_id", torch.unique(trained))[:, 0]
    result["report"] = hashing_report(
        groups, config.optim.embedding, [data.batch("eval", rank, s)[0] for s in range(2)],
        model=job.model,
    )
    # The reset an admission applies, on this rank's first two ad_id rows.
    sharded = next(
        m for m in job.model.modules()
        if isinstance(m, ShardedManagedCollection) and "ad_id" in m._table_to_tbe_and_index
    )
    tbe, index = sharded._table_to_tbe_and_index["ad_id"]
    weight = tbe.split_embedding_weights()[int(index[0])]
    state = tbe.split_optimizer_states()[int(index[0])][0]
    before = weight[:2].clone()
    had_state = bool((state[:2] > 0).all())
    reset_rows(sharded, "ad_id", torch.tensor([0, 1]))
    result["reset"] = {
        "had_state": had_state,
        "state_after": state[:2].clone(),
        "changed": bool((weight[:2] != before).any(dim=1).all()),
        "bound_ok": bool((weight[:2].abs() <= (1 / 8) ** 0.5).all()),
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out_path)


def test_managed_tables_sharded_over_two_ranks(tmp_path):
    out_path = tmp_path / "ranks.pt"
    run_ranks(worker, 2, str(out_path))
    ranks = torch.load(out_path, weights_only=False)
    first = ranks[0]
    assert first["types"]["user_id"] == first["types"]["ad_id"] == "row_wise"
    assert_matches_range_split_reference(first, ranks)
    # 3 groups: 3 plain collections + 2 managed ones, each pipelined behind its own mapper.
    assert first["pipelined"] == first["postprocs"] == 5

    for name in ("user_id", "ad_id"):
        ids = torch.cat([r["maps"][name][0] for r in ranks])
        rows = torch.cat([r["maps"][name][1] for r in ranks])
        assert ids.numel() > 0
        assert ids.unique().numel() == ids.numel(), f"{name}: an ID held by two ranks"
        assert rows.unique().numel() == rows.numel(), f"{name}: two IDs share a row"
        assert bool((ids >= 0).all()) and bool((ids < MANAGED_INPUT_SPACE).all())
        for rank, result in enumerate(ranks):
            held_ids, held_rows = result["maps"][name]
            low, high = result["row_range"][name]
            assert bool((held_rows >= low).all()) and bool((held_rows < high - 1).all()), (
                f"{name} rank {rank}: a row outside its shard (or its shared last row)"
            )
        # Ranks own consecutive slices of the hashed ID space.
        if ranks[0]["maps"][name][0].numel() and ranks[1]["maps"][name][0].numel():
            assert ranks[0]["maps"][name][0].max() < ranks[1]["maps"][name][0].min()

    # Rows to spare: every user_id trained on holds a row of its own.
    trained = torch.cat([r["trained_user_ids"] for r in ranks]).unique()
    held = torch.cat([r["maps"]["user_id"][0] for r in ranks])
    assert set(trained.tolist()) == set(held.tolist())
    # ad_id had 8 rows for more IDs: the maps are full (3 own rows per rank) and evicted.
    assert sum(r["maps"]["ad_id"][0].numel() for r in ranks) == 6

    # The report counts rows through the live maps: IDs with own rows + one shared row per
    # shard that the others land on.
    report = first["report"]
    assert report == ranks[1]["report"]
    user = report["user_id"]
    assert user["method"] == "managed" and user["rows"] == 1024
    assert user["eval_distinct_ids"] > 0
    assert user["eval_distinct_rows"] <= user["eval_distinct_ids"]
    ad = report["ad_id"]
    assert ad["eval_distinct_rows"] <= 8 and ad["measured_collision_rate"] > 0.5

    for result in ranks:
        reset = result["reset"]
        assert reset["had_state"], "the rows were trained: row-wise Adagrad state > 0"
        assert bool((reset["state_after"] == 0).all())
        assert reset["changed"] and reset["bound_ok"]


def assert_matches_range_split_reference(first: dict, ranks: list[dict]) -> None:
    """The 2-rank run equals one process with two maps per managed table, split by hashed-ID
    range, fed the global batch: per-rank losses and logits, tables, and each rank's map."""
    config = compose_config(OVERRIDES)
    groups = feature_groups(config.features, config.hashing)
    reference = train_unsharded(config, groups, 2, STEPS, managed_init_fn=replayable_init)
    outputs = first["outputs"]
    torch.testing.assert_close(
        outputs["losses"], reference["rank_losses"], atol=ATOL, rtol=0,
        msg=lambda m: f"per-rank losses differ from the reference: {m}",
    )
    torch.testing.assert_close(
        outputs["logits"], reference["logits"], atol=ATOL, rtol=0,
        msg=lambda m: f"per-rank logits differ from the reference: {m}",
    )
    assert set(first["tables"]) == set(reference["tables"])
    for name, table in reference["tables"].items():
        torch.testing.assert_close(
            first["tables"][name], table, atol=ATOL, rtol=0,
            msg=lambda m, n=name: f"table {n} differs from the reference: {m}",
        )
        moved = float((table - reference["initial_tables"][name]).abs().max())
        assert moved > 1000 * ATOL, f"table {name} moved only {moved:.2e}"

    collections = [
        group.managed_collection
        for group in reference["model"].model.embedding_groups.values()
        if isinstance(group.managed_collection, RangeSplitManagedCollection)
    ]
    expected_maps = {k: v for c in collections for k, v in shard_maps(c).items()}
    assert set(expected_maps) == {"user_id", "ad_id"}
    for name, shards in expected_maps.items():
        for rank, (expected_ids, expected_rows) in enumerate(shards):
            ids, rows = ranks[rank]["maps"][name]
            order, expected_order = ids.argsort(), expected_ids.argsort()
            assert torch.equal(ids[order], expected_ids[expected_order]), (
                f"{name} rank {rank}: admitted IDs differ from the reference's shard {rank}"
            )
            assert torch.equal(rows[order], expected_rows[expected_order]), (
                f"{name} rank {rank}: ID -> row differs from the reference's shard {rank}"
            )
            module = next(c for c in collections if name in c.maps).maps[name][rank]
            low = module._output_global_offset
            assert ranks[rank]["row_range"][name] == (low, low + module._zch_size)


def test_admitted_finds_ids_in_a_sorted_map():
    class Map:
        _mch_sorted_raw_ids = torch.tensor([3, 9, 40, torch.iinfo(torch.int64).max])

    found = admitted(Map(), torch.tensor([9, 10, 40, 2, 1 << 62]))  # type: ignore[arg-type]
    assert found.tolist() == [True, False, True, False, False]


BASE = [*OVERRIDES, "trainer.eval_every=0", "logger.log_every=1", "trainer.precision=fp32"]


def test_managed_resume_equals_uninterrupted(tmp_path):
    """The maps (IDs, rows, eviction metadata, step counter) survive a checkpoint."""
    first = run_train([*BASE, "trainer.steps=6", f"hydra.run.dir={tmp_path}/a"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_train(
        [*BASE, "trainer.steps=12", "trainer.resume=auto", f"hydra.run.dir={tmp_path}/a"],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run_train([*BASE, "trainer.steps=12", f"hydra.run.dir={tmp_path}/b"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    def summary(run: str) -> dict:
        return json.loads((tmp_path / run / "summary.json").read_text())

    assert summary("a")["state_digest"] == summary("b")["state_digest"]
    assert summary("a")["hashing"]["ad_id"] == summary("b")["hashing"]["ad_id"]
