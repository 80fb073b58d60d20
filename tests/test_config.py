"""Every option of every config group composes, validates and builds; bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import CONF_DIR, TINY, compose_config, run_train
from train.build import build_click_model, feature_groups
from train.frequency_counts import save_frequency_file
from train.hashing.budget import budget_facts
from train.run import validated

GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF_DIR.iterdir()
    if group.is_dir()
    for option in group.glob("*.yaml")
)


def test_groups_are_the_documented_ones():
    groups = {group for group, _ in GROUP_OPTIONS}
    assert {"features", "model", "data", "sharding", "optim", "logger", "experiment"} <= groups


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) in (("hashing", "frequency"), ("hashing", "full")):  # a counting run's file
        path = tmp_path / "frequencies.pt"
        ids = {f: torch.arange(100_000) for f in ["user_id", "user_interests", "ad_id",
                                                  "advertiser_id", "site_id"]}
        save_frequency_file(path, {"ids": ids, "counts": ids}, {})
        overrides.append(f"hashing.frequency_file={path}")
    if (group, option) == ("data", "parquet"):  # the user's own logs: paths are required
        overrides += ["data.train_path=/logs/train", "data.eval_path=/logs/eval"]
    if (group, option) == ("features", "from_data"):  # derived from Parquet columns at run time
        overrides += ["data=parquet", "data.train_path=/logs/train", "data.eval_path=/logs/eval"]
        config = compose_config(overrides)
        assert validated(config) == (config, None)
        return
    config = compose_config(overrides)
    if (group, option) == ("data", "parquet"):  # features=from_data: derived at run time
        assert config.features.name == "from_data"
        config = compose_config([*overrides, "features=default"])
    # One process's facts, for a memory budget (experiment=billion_users has one).
    groups = feature_groups(config.features, config.hashing, budget_facts(config, 1))
    model = build_click_model(config, groups, torch.device("meta"))
    assert model.model.group_names == [g.name for g in groups]


def test_many_tables_has_at_least_200_tables():
    config = compose_config(["features=many_tables"])
    groups = feature_groups(config.features, config.hashing)
    assert sum(len(g.features) for g in groups) >= 200


def test_dcn_builds_with_mixed_embedding_dims():
    config = compose_config(["model=dcn", "features.groups.context.embedding_dim=8"])
    groups = feature_groups(config.features, config.hashing)
    model = build_click_model(config, groups, torch.device("meta"))
    assert model.model.interaction.output_dim == 128 + 16 * 6 + 8 * 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.stepz=3", "Key 'stepz' not in 'TrainerConfig'"),
        ("trainer.steps=abc", "trainer.steps"),
        ("trainer.steps=0", "trainer.steps must be > 0"),
        ("sharding.preset=diagonal", "sharding.preset='diagonal' is not one of"),
        ("features.groups.user.features.user_id.num_embeddings=0", "user_id: num_embeddings"),
        ("+sharding.tables.no_such_table=row_wise", "unknown tables ['no_such_table']"),
        ("features.groups.user.embedding_dim=6", "dot interaction needs every group"),
        ("sharding=column_wise features.embedding_dim=6 model.dense_layer_sizes=[16,6]",
         "column-wise sharding needs an embedding_dim divisible by 4"),
        # Hashing: k < 1, q < 2, buckets above the ID space, unknown features, missing file,
        # a concat combiner under dot interaction, an unknown method.
        ("hashing=multi_hash hashing.num_hashes=0", "hashing.num_hashes (k) must be >= 1, got 0"),
        ("+hashing.features.user_id={method:qr,q:1}",
         "hashing.features.user_id.q must be >= 2"),
        # Hashed methods may have more rows than IDs (fewer collisions); modulo never uses them.
        ("hashing=modulo features.groups.ad.features.advertiser_id.num_embeddings=60000",
         "feature advertiser_id: num_embeddings=60000 buckets is above the declared id_space=50000"),
        ("+hashing.features.user_idd=hash", "hashing.features names unknown features ['user_idd']"),
        ("hashing=frequency hashing.frequency_file=no/such/file.pt",
         "hashing.frequency_file=no/such/file.pt: no such file"),
        ("+hashing.features.ad_id={method:multi_hash,combine:concat}",
         "dot interaction needs one dim for every feature"),
        ("hashing.method=mangled", "hashing.method='mangled' is not one of"),
        # managed: TorchRec shards it row-wise only; the map's knobs are checked.
        ("hashing=managed sharding=table_wise",
         "table user_id uses hashing managed, which TorchRec shards row-wise only; "
         "sharding.preset=table_wise cannot place it"),
        ("hashing=managed +sharding.tables.ad_id=data_parallel",
         "sharding.tables.ad_id=data_parallel cannot place it"),
        ("hashing=managed hashing.eviction_interval=0", "hashing.eviction_interval must be > 0"),
        ("hashing=managed hashing.eviction_policy=fifo", "hashing.eviction_policy='fifo' is not one of"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, override, message):
    result = run_train([*TINY, *override.split()], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/**/summary.json"))


@pytest.mark.parametrize(
    "override,key,schema",
    [
        # `+key` is Hydra's own hint for the typo trainer.stepz; it adds the key past the
        # schema, so hashrec checks every key against the dataclasses itself.
        ("+trainer.stepz=3", "trainer.stepz", "TrainerConfig"),
        ("+stepz=3", "stepz", "Config"),
        ("+features.groups.user.features.user_id.idspace=5",
         "features.groups.user.features.user_id.idspace", "FeatureConfig"),
        ("++optim.warmup_stepz=5", "optim.warmup_stepz", "OptimConfig"),
    ],
)
def test_a_key_added_with_plus_is_still_checked(tmp_path, override, key, schema):
    result = run_train([*TINY, override], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    name = key.rsplit(".", 1)[-1]
    assert result.stderr.strip().splitlines() == [
        f"hashrec: error: unknown key {key} ({schema} has no field '{name}')"
    ], result.stderr[-2000:]
    assert not list(tmp_path.glob("outputs/**/summary.json"))
