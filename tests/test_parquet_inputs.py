"""Your own Parquet logs (issue 15): every mistake named before training, one command from
columns to a model (list columns, no dense columns), rows split over ranks, every eval row
scored once, a shuffled training order that resumes exactly.

Most tests run the data source directly on small files they write; a few run whole jobs to
show the one-line, exit-2 behaviour and the one-command form on 2 ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modules.data_sources import ParquetSource
from modules.data_sources.parquet import PADDING_LABEL
from modules.features import FeatureGroupSpec, FeatureSpec, HashingSpec
from modules.tabular import BadRowError, Bags
from tests.helpers import compose_config, run_train
from tests.test_criteo import summary_of

BATCH = 16


def movielens_like(num_rows: int, seed: int = 0) -> pa.Table:
    """A rating log shaped like MovieLens: string user IDs, int item IDs, a list of genres,
    a 1-5 rating; the label (rating >= 4) follows the user and item."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 300, num_rows)
    items = rng.integers(0, 200, num_rows)
    genres = [[f"g{g}" for g in rng.choice(18, rng.integers(0, 4), replace=False)]
              for _ in range(num_rows)]
    logit = (users % 7 - 3) * 0.5 + (items % 5 - 2) * 0.6
    rating = np.clip(np.round(3 + logit + rng.normal(0, 1, num_rows)), 1, 5).astype(np.int64)
    return pa.table({
        "row": pa.array(np.arange(num_rows), pa.int64()),
        "user_id": pa.array([f"u{u}" for u in users], pa.string()),
        "item_id": pa.array(items, pa.int64()),
        "genres": pa.array(genres, pa.list_(pa.string())),
        "price": pa.array(rng.random(num_rows) * 10, pa.float64()),
        "label": pa.array((rating >= 4).astype(np.int64)),
        "rating": pa.array(rating),
    })


def write(path: Path, table: pa.Table, row_group_size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def feature(name: str, ids_per_sample: int = 1) -> FeatureSpec:
    return FeatureSpec(name, 1000, 1000, ids_per_sample=ids_per_sample, hashing=HashingSpec("hash"))


def source(train: Path, eval_: Path | None = None, *, label: str = "label",
           dense: tuple[str, ...] = ("price",), categorical: tuple[str, ...] = ("user_id", "item_id", "genres"),
           ids_per_sample: dict[str, int] | None = None, **kwargs) -> ParquetSource:
    features = tuple(feature(name, (ids_per_sample or {}).get(name, 1)) for name in categorical)
    return ParquetSource(
        train, eval_ or train, [FeatureGroupSpec("g", 8, features)], BATCH, label,
        list(dense), list(categorical), **kwargs,
    )


# ---- every mistake named, before training -------------------------------------------------


def test_an_empty_file_is_named_when_the_source_is_made(tmp_path):
    empty = write(tmp_path / "train" / "part-0.parquet", movielens_like(0))
    with pytest.raises(ValueError, match=r"no rows \(empty Parquet file"):
        source(empty)
    with pytest.raises(ValueError, match=r"eval.*no rows \(empty Parquet files\)"):
        write(tmp_path / "eval" / "part-0.parquet", movielens_like(0))
        source(write(tmp_path / "ok.parquet", movielens_like(50)), tmp_path / "eval")


def test_an_eval_set_whose_every_row_is_dropped_fails_before_training(tmp_path):
    table = movielens_like(40)
    bad = table.set_column(4, "price", pa.array([float("nan")] * 40))
    parquet = source(write(tmp_path / "t.parquet", table), write(tmp_path / "e.parquet", bad),
                     skip_bad_rows=True)
    assert parquet.num_local_eval_batches(0, 1) == 0
    with pytest.raises(ValueError, match="no rows after dropping bad rows"):
        next(parquet.eval_batches(0, 1))


def test_a_label_that_is_not_0_or_1_is_named_with_its_row(tmp_path):
    table = movielens_like(300)
    parquet = source(write(tmp_path / "t.parquet", table), label="rating")
    with pytest.raises(BadRowError, match=r"t.parquet row group 0, row \d+: label rating is \d, not 0 or 1"):
        parquet.check_first_row_groups()
    # A bad label past the first row group is found as the row group is read.
    labels = table["label"].to_numpy().copy()
    labels[250] = 2
    later = table.set_column(5, "label", pa.array(labels))
    parquet = source(write(tmp_path / "later.parquet", later))
    parquet.check_first_row_groups()  # row group 0 is clean
    with pytest.raises(BadRowError, match=r"later.parquet row group 2, row 50: label label is 2"):
        list(parquet.train_batches(0, 1, 0, 300 // BATCH))


def test_a_negative_integer_id_is_an_error_not_a_missing_value(tmp_path):
    table = movielens_like(50)
    items = table["item_id"].to_numpy().copy()
    items[7] = -1
    parquet = source(write(tmp_path / "t.parquet", table.set_column(2, "item_id", pa.array(items))))
    with pytest.raises(BadRowError, match=r"row group 0, row 7: categorical item_id has ID -1"):
        parquet.check_first_row_groups()
    # In a list column too, naming the row that holds it.
    bags = pa.array([[1, 2], None, [3, -5]] + [[1]] * 47, pa.list_(pa.int64()))
    parquet = source(write(tmp_path / "l.parquet", table.set_column(3, "genres", bags)))
    with pytest.raises(BadRowError, match=r"row 2: categorical genres has ID -5"):
        parquet.check_first_row_groups()


def test_a_null_id_is_a_missing_value(tmp_path):
    table = movielens_like(BATCH)
    items = pa.array([None] + list(range(1, BATCH)), pa.int64())
    parquet = source(write(tmp_path / "t.parquet", table.set_column(2, "item_id", items)))
    batch = next(parquet.train_batches(0, 1, 0, 1))
    assert batch.sparse_features["g"]["item_id"].lengths()[:2].tolist() == [0, 1]


def test_uint64_ids_are_refused_by_name(tmp_path):
    table = movielens_like(20)
    table = table.set_column(2, "item_id", pa.array(np.arange(20, dtype=np.uint64)))
    with pytest.raises(ValueError, match=r"t.parquet: categorical column item_id is uint64"):
        source(write(tmp_path / "t.parquet", table))


def test_a_string_dense_column_is_refused_by_name(tmp_path):
    table = movielens_like(20)
    table = table.set_column(4, "price", pa.array([str(i) for i in range(20)]))
    with pytest.raises(ValueError, match=r"t.parquet: dense column price is string"):
        source(write(tmp_path / "t.parquet", table))


def test_null_dense_values_fail_or_become_zero_or_the_mean(tmp_path):
    table = movielens_like(BATCH)
    prices = [None, 2.0, 4.0] + [6.0] * (BATCH - 3)
    path = write(tmp_path / "t.parquet", table.set_column(4, "price", pa.array(prices)))
    with pytest.raises(BadRowError, match=r"t.parquet row group 0, row 0: dense feature price is null"):
        source(path).check_first_row_groups()
    zero = next(source(path, dense_null="zero").train_batches(0, 1, 0, 1))
    assert zero.dense_features[0, 0] == 0
    mean = next(source(path, dense_null="mean").train_batches(0, 1, 0, 1))
    expected = (2 + 4 + 6 * (BATCH - 3)) / (BATCH - 1)
    assert mean.dense_features[0, 0].item() == pytest.approx(expected)


def test_a_list_where_one_value_is_expected_and_the_reverse_are_named(tmp_path):
    table = movielens_like(20)
    as_list = table.set_column(4, "price", pa.array([[1.0]] * 20, pa.list_(pa.float64())))
    with pytest.raises(ValueError, match=r"dense column price is a list .* one number per row"):
        source(write(tmp_path / "a.parquet", as_list))
    # A feature declared multi-ID (a feature YAML's ids_per_sample) on a one-value column.
    with pytest.raises(ValueError, match=r"feature item_id declares ids_per_sample=3 .* one value per row"):
        source(write(tmp_path / "b.parquet", table), ids_per_sample={"item_id": 3})
    # A column that is a list in one file and one value per row in another.
    scalar_genres = table.set_column(3, "genres", pa.array(["g1"] * 20))
    write(tmp_path / "mixed" / "part-0.parquet", table)
    write(tmp_path / "mixed" / "part-1.parquet", scalar_genres)
    with pytest.raises(ValueError, match=r"part-1.parquet: categorical column genres is one value per row here but a list per row in other files"):
        source(tmp_path / "mixed")


def test_a_dense_count_that_does_not_match_the_model_is_named(tmp_path):
    from train.data import build_data_source
    from train.distributed import DistributedContext
    from train.build import feature_groups

    path = write(tmp_path / "t.parquet", movielens_like(50))
    config = compose_config([
        "features=criteo", "data=parquet", f"data.train_path={path}", f"data.eval_path={path}",
        "data.dense_columns=[price]", "data.categorical_columns=[C1]",
    ])
    context = DistributedContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=r"data.dense_columns lists 1 column\(s\) but the model "
                                         r"takes features.num_dense_features=13"):
        build_data_source(config, feature_groups(config.features, config.hashing), context)


def test_a_rating_column_as_label_stops_the_job_with_one_line_before_training(tmp_path):
    path = write(tmp_path / "t.parquet", movielens_like(200))
    result = run_train([
        "data=parquet", f"data.train_path={path}", f"data.eval_path={path}",
        "data.label_column=rating", "data.categorical_columns=[user_id,item_id,genres]",
        "trainer.steps=5", "logger.mode=disabled",
    ], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "t.parquet row group 0, row 0: label rating is" in result.stderr
    assert "Traceback" not in result.stderr
    assert "step " not in result.stdout  # stopped before the first step


def test_an_empty_file_stops_the_job_with_one_line_instead_of_hanging(tmp_path):
    empty = write(tmp_path / "train" / "part-0.parquet", movielens_like(0))
    good = write(tmp_path / "eval" / "part-0.parquet", movielens_like(40))
    result = run_train([
        "data=parquet", f"data.train_path={empty.parent}", f"data.eval_path={good}",
        "data.categorical_columns=[user_id,item_id,genres]", "trainer.steps=5",
        "logger.mode=disabled",
    ], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"hashrec: error: {empty.parent}: no rows (empty Parquet files)")


def test_plan_only_never_materialises_the_tables(tmp_path):
    """features=criteo_mlperf is 104 GB of tables: plan_only plans them on the meta device."""
    result = run_train(["plan_only=true", "features=criteo_mlperf", "model=dcn",
                        "logger.mode=disabled"], cwd=tmp_path, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), result.stderr[-2000:]
    assert "sharding plan" in result.stdout or "hashrec: error:" in result.stderr


def test_a_stop_signal_the_loop_cannot_act_on_is_not_swallowed(tmp_path):
    """A second SIGTERM, long after a first that no step has acted on, stops at once."""
    from train.checkpoint_policy import CheckpointPolicy
    from train.config import CheckpointConfig

    policy = CheckpointPolicy(tmp_path, torch.nn.Linear(1, 1), None, CheckpointConfig(), 10, print)
    with policy.signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert policy.signal_received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the same request delivered twice: still a flag
        at, steps = policy._first_signal_at
        policy._first_signal_at = (at - 60, steps)  # a minute later, no step done
        with pytest.raises(KeyboardInterrupt, match="a second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


# ---- reading -------------------------------------------------------------------------------


def test_every_eval_row_is_scored_exactly_once_for_any_number_of_ranks(tmp_path):
    # 103 rows in one row group of 103, and in row groups of 10: fewer row groups than ranks,
    # a last partial batch on every rank.
    table = movielens_like(103)
    for row_group_size in (103, 10):
        path = write(tmp_path / f"e{row_group_size}.parquet", table, row_group_size)
        for world_size in (1, 2, 3):
            parquet = source(path, dense=(), categorical=("row",))
            seen, counts = [], []
            for rank in range(world_size):
                batches = list(parquet.eval_batches(rank, world_size))
                counts.append(len(batches))
                for batch in batches:
                    assert len(batch.labels) == BATCH
                    real = batch.labels != PADDING_LABEL
                    ids = batch.sparse_features["g"]["row"]
                    assert ids.lengths()[~real].sum() == 0  # padding rows have empty bags
                    seen += ids.values().tolist()
            assert sorted(seen) == list(range(103)), (row_group_size, world_size)
            assert len(set(counts)) == 1  # the same number of batches on every rank


def test_one_row_group_trains_on_two_ranks(tmp_path):
    path = write(tmp_path / "t.parquet", movielens_like(100), row_group_size=100)
    parquet = source(path, dense=(), categorical=("row",))
    rows = [next(parquet.train_batches(rank, 2, 0, 1)).sparse_features["g"]["row"].values()
            for rank in (0, 1)]
    assert rows[0].tolist() == list(range(BATCH)) and rows[1].tolist() == list(range(50, 50 + BATCH))


def test_a_shuffled_stream_started_at_step_s_is_the_tail_of_one_started_at_zero(tmp_path):
    path = write(tmp_path / "t.parquet", movielens_like(300), row_group_size=40)
    steps, shuffled = 25, {"shuffle_rows": 50, "seed": 3, "categorical": ("row",)}
    # Windows of 64 rows (50 rounded up to batches of 16): 4 batches each.
    for rank in (0, 1):
        whole = list(source(path, **shuffled).train_batches(rank, 2, 0, steps))
        rows = [b.sparse_features["g"]["row"].values().tolist() for b in whole]
        plain = [b.sparse_features["g"]["row"].values().tolist()
                 for b in source(path, categorical=("row",)).train_batches(rank, 2, 0, 4)]
        assert rows[:4] != plain and sorted(sum(rows[:4], [])) == sorted(sum(plain, []))
        for start in (1, 4, 6, 19):
            tail = list(source(path, **shuffled).train_batches(rank, 2, start, steps))
            assert [b.sparse_features["g"]["row"].values().tolist() for b in tail] == rows[start:]
            assert all(torch.equal(a.dense_features, b.dense_features)
                       for a, b in zip(tail, whole[start:]))


def test_dense_normalisation_uses_the_statistics(tmp_path):
    path = write(tmp_path / "t.parquet", movielens_like(BATCH))
    prices = pq.read_table(path)["price"].to_numpy()
    batch = next(source(path, dense_transform="standardize").train_batches(0, 1, 0, 1))
    expected = (prices - prices.mean()) / prices.std()
    assert np.allclose(batch.dense_features[:, 0].numpy(), expected, atol=1e-5)
    saved = {"dense": {"price": {"mean": 1.0, "std": 2.0}}}  # read back from a run: reused
    batch = next(source(path, dense_transform="standardize", statistics=saved).train_batches(0, 1, 0, 1))
    assert np.allclose(batch.dense_features[:, 0].numpy(), (prices - 1) / 2, atol=1e-5)
    log = next(source(path, dense_transform="log").train_batches(0, 1, 0, 1))
    assert np.allclose(log.dense_features[:, 0].numpy(), np.log1p(prices), atol=1e-5)


def test_bags_take_keeps_each_rows_ids():
    bags = Bags(np.array([1, 2, 3, 4, 5, 6]), np.array([2, 0, 3, 1], np.int32))
    taken = bags.take(np.array([3, 0, 1, 2]))
    assert taken.values.tolist() == [6, 1, 2, 3, 4, 5] and taken.lengths.tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("interaction", ["dlrm", "dcn"])
def test_a_model_without_dense_features_trains(interaction):
    from train.build import build_click_model, feature_groups

    config = compose_config(["features.num_dense_features=0", f"model={interaction}",
                             "model.dcn_low_rank_dim=8", "trainer.precision=fp32"])
    groups = feature_groups(config.features, config.hashing)
    model = build_click_model(config, groups, torch.device("cpu"))
    from modules.tabular import columns_to_batch

    ids = {f.name: np.arange(4) for g in groups for f in g.features}
    batch = columns_to_batch(np.array([0, 1, 0, 1]), np.zeros((4, 0)), ids, groups)
    loss, (_, logits, _) = model(batch)
    loss.backward()
    assert logits.shape == (4,) and torch.isfinite(loss)


# ---- one command ---------------------------------------------------------------------------

# The README's conversion of a CSV log to Parquet (pyarrow only), run as written there.
CONVERT = """
import pyarrow.csv as csv, pyarrow.compute as pc, pyarrow.parquet as pq
t = csv.read_csv("ratings.csv")
t = t.set_column(t.schema.get_field_index("genres"), "genres", pc.split_pattern(t["genres"], "|"))
t = t.append_column("label", pc.cast(pc.greater_equal(t["rating"], 4), "int8")).drop_columns(["rating"])
pq.write_table(t, "ratings.parquet")
"""


def csv_to_parquet(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True)
    lines = ["user_id,item_id,genres,rating"] + [
        f"{u},{i},{'|'.join(g)},{r}" for u, i, g, r in zip(
            table["user_id"].to_pylist(), table["item_id"].to_pylist(),
            table["genres"].to_pylist(), table["rating"].to_pylist())
    ]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-c", CONVERT], cwd=folder, check=True)
    return folder / "ratings.parquet"


def test_the_readme_example_trains_on_two_ranks_from_one_command(tmp_path):
    """A CSV of ratings -> Parquet (one pyarrow command) -> python -m train data=parquet on
    2 ranks: features derived from the columns (a list column, no dense column), every eval
    row scored once."""
    train = csv_to_parquet(tmp_path / "train", movielens_like(3000, seed=0))
    eval_ = csv_to_parquet(tmp_path / "eval", movielens_like(1001, seed=1))
    assert pq.read_schema(train).field("genres").type == pa.list_(pa.string())
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = run_train([
        "data=parquet", f"data.train_path={train}", f"data.eval_path={eval_}",
        "trainer.steps=40", "trainer.batch_size=64", "data.shuffle_rows=1024",
        "logger.mode=disabled", "data.prefetch_batches=0",
    ], cwd=tmp_path, timeout=400, launcher=[torchrun, "--standalone", "--nproc_per_node", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "genres: " in result.stdout and "(list)" in result.stdout
    summary = summary_of(tmp_path)
    assert summary["world_size"] == 2
    assert summary["evals"][-1]["num_samples"] == 1001
    assert set(summary["hashing"]) == {"user_id", "item_id", "genres"}
    assert summary["eval_auc"] > 0.6
    run_dir = next(tmp_path.glob("outputs/**/summary.json")).parent
    assert (run_dir / "data_statistics.json").exists()
