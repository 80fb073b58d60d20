"""Hashing methods on their own: mappings, range errors, combiners, collision statistics."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.collisions import (
    distinct_signatures,
    expected_collision_rate,
    feature_expected_collision_rate,
    measured_collision_rate,
)
from modules.embeddings import embedding_collection
from modules.features import FeatureGroupSpec, FeatureSpec, HashingSpec, qr_remainder_rows
from modules.hash_combine import PooledCombiner
from modules.hash_functions import hash64, non_negative, seed_salt
from modules.hashing import feature_keys, qr_virtual_size
from modules.id_mapping import HashingIdMapper, IdOutOfRangeError
from tests.helpers import TINY, run_train
from train.frequency_counts import count_frequent_ids

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def feature(name, method, rows=100, id_space=10**9, ids_per_sample=1, **hashing):
    return FeatureSpec(name, id_space, rows, ids_per_sample=ids_per_sample,
                       hashing=HashingSpec(method, **hashing))


def kjt(features: dict[str, torch.Tensor], batch_size: int) -> KeyedJaggedTensor:
    lengths = [torch.full((batch_size,), v.numel() // batch_size, dtype=torch.int32)
               for v in features.values()]
    return KeyedJaggedTensor(list(features), torch.cat(list(features.values())),
                             lengths=torch.cat(lengths))


def test_every_method_maps_into_its_tables_and_keys_follow_table_order():
    frequent = torch.tensor([42, -5, 7])
    features = [
        feature("h", "hash"),
        feature("n", "none", rows=50, id_space=50),
        feature("m", "multi_hash", num_hashes=3, importance_rows=16),
        feature("q", "qr", rows=100, id_space=10**6, ids_per_sample=2),
        feature("f", "frequency", frequent_ids=frequent),
        feature("o", "modulo"),
    ]
    mapper = HashingIdMapper(features)
    group = FeatureGroupSpec("g", 8, tuple(features))
    ebc = embedding_collection(group, torch.device("cpu"))
    # The unsharded collection's key order is its tables' feature names, concatenated.
    assert mapper.output_keys == [k for t in ebc.embedding_bag_configs() for k in t.feature_names]
    ids = torch.tensor([INT64_MIN, -1, 0, 7, 42, INT64_MAX])
    raw = {"h": ids, "n": torch.tensor([0, 49, 3, 4, 5, 6]), "m": ids, "q": torch.cat([ids, ids]),
           "f": ids, "o": ids}
    rows = mapper(kjt(raw, 6)).to_dict()
    salt = seed_salt(0, "id-hash", "h", 0)
    assert torch.equal(rows["h"].values(), non_negative(hash64(ids, salt)) % 100)
    assert torch.equal(rows["n"].values(), raw["n"])
    assert torch.equal(rows["o"].values(), torch.remainder(ids, 100))
    for key in ("m#h0", "m#h1", "m#h2"):
        assert 0 <= rows[key].values().min() and rows[key].values().max() < 100
    assert rows["m#w"].values().max() < 16
    assert not torch.equal(rows["m#h0"].values(), rows["m#h1"].values())
    # QR: (quotient, remainder) is the hashed virtual index, factorised.
    q = qr_remainder_rows(features[3])
    virtual = non_negative(hash64(raw["q"], seed_salt(0, "id-hash", "q", 0))) % (10**6 // q * q)
    assert torch.equal(rows["q#q"].values() * q + rows["q#r"].values(), virtual)
    assert rows["q#q"].lengths().eq(2).all()
    # Frequency: frequent IDs take their rank's row, the rest hash into rows 3..99.
    f_rows = rows["f"].values()
    assert f_rows[ids == 42].item() == 0 and f_rows[ids == 7].item() == 2
    assert (f_rows[(ids != 42) & (ids != 7)] >= 3).all() and f_rows.max() < 100
    # The frequent IDs are part of the model: saved (and loaded) with its state dict.
    state = mapper.state_dict()
    assert sorted(state["frequent_ids_8"].tolist()) == sorted(frequent.tolist())
    restored = HashingIdMapper(features[:4] + [feature("f", "frequency", frequent_ids=torch.tensor([1, 2, 3]))] + features[5:])
    restored.load_state_dict(state)
    assert torch.equal(restored(kjt(raw, 6)).to_dict()["f"].values(), f_rows)
    # The same mapping through feature_rows (used by the collision report).
    assert torch.equal(mapper.feature_rows("m", ids)[:, 3], rows["m#w"].values())
    assert torch.equal(mapper.feature_rows("n", torch.tensor([3])), torch.tensor([[3]]))


@pytest.mark.parametrize("bad", [-1, 50, INT64_MAX, INT64_MIN])
def test_none_rejects_ids_outside_the_table_naming_feature_and_value(bad):
    mapper = HashingIdMapper([feature("a", "hash"), feature("n", "none", rows=50, id_space=50)])
    with pytest.raises(IdOutOfRangeError, match=rf"feature n \(hashing none\): raw ID {bad} is outside \[0, 50\)"):
        mapper(kjt({"a": torch.tensor([1, 2]), "n": torch.tensor([3, bad])}, 2))


def test_deferred_none_check_records_the_first_bad_id_and_maps_it_in_range():
    """Training defers the check (no sync per step): forward records the first bad ID on the
    device, keeps it over later batches, and still maps every ID onto a real row."""
    mapper = HashingIdMapper([feature("a", "multi_hash", num_hashes=2),
                              feature("n", "none", rows=50, id_space=50),
                              feature("m", "none", rows=8, id_space=8)])
    mapper.defer_range_errors = True
    rows = mapper(kjt({"a": torch.tensor([1, 2]), "n": torch.tensor([3, 4]),
                       "m": torch.tensor([5, 6])}, 2))
    assert mapper.out_of_range_error(mapper.out_of_range.tolist()) is None
    rows = mapper(kjt({"a": torch.tensor([1, 2]), "n": torch.tensor([3, 77]),
                       "m": torch.tensor([9, -1])}, 2))
    assert 0 <= rows["n"].values().min() and rows["n"].values().max() < 50
    mapper(kjt({"a": torch.tensor([1, 2]), "n": torch.tensor([60, 3]),
                "m": torch.tensor([1, 1])}, 2))
    error = mapper.out_of_range_error(mapper.out_of_range.tolist())
    assert str(error).startswith("feature n (hashing none): raw ID 77 is outside [0, 50)")


def test_training_on_ids_outside_a_none_table_stops_with_one_line(tmp_path):
    """Planted IDs of user_country span [0, 200) but its table has 100 rows. Training defers
    the check to the first logging step (log_every=3) and exits with the one line."""
    result = run_train([*TINY, "trainer.steps=6", "logger.log_every=3",
                        "features.groups.user.features.user_country.num_embeddings=100",
                        f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"hashrec: error: feature user_country \(hashing none\): raw ID 1\d\d is "
                        r"outside \[0, 100\); use hashing modulo or hash .*", last), last
    assert not re.search(r"^step +3/6", result.stdout, re.M)  # stopped before its report


def test_mapped_kjt_carries_its_lengths_per_key():
    """Its lengths per key are set from the host lists, so TorchRec's input dist does not
    compute them from the device lengths (.tolist(), a sync on GPU)."""
    mapper = HashingIdMapper([feature("a", "multi_hash", num_hashes=2),
                              feature("q", "qr", rows=100, ids_per_sample=2)])
    rows = mapper(kjt({"a": torch.tensor([1, 2, 3]), "q": torch.arange(6)}, 3))
    assert rows._length_per_key == [3, 3, 6, 6]
    assert rows._offset_per_key == [0, 3, 6, 12, 18]


def test_combiners_sum_concat_mult_and_importance_weights():
    features = [
        feature("s", "multi_hash", num_hashes=2),
        feature("c", "multi_hash", num_hashes=3, combine="concat"),
        feature("w", "multi_hash", num_hashes=2, importance_rows=4),
        feature("m", "qr", rows=10, id_space=1000),
        feature("a", "qr", rows=10, id_space=1000, combine="sum"),
        feature("k", "qr", rows=10, id_space=1000, combine="concat"),
    ]
    pooled = {key: torch.randn(3, 4) for f in features for key in feature_keys(f)}
    out = PooledCombiner(features)(pooled)
    torch.testing.assert_close(out[0], pooled["s#h0"] + pooled["s#h1"])
    assert out[1].shape == (3, 12)
    weights = pooled["w#w"]
    torch.testing.assert_close(
        out[2], pooled["w#h0"] * (1 + weights[:, :1]) + pooled["w#h1"] * (1 + weights[:, 1:2])
    )
    torch.testing.assert_close(out[3], pooled["m#q"] * pooled["m#r"])
    torch.testing.assert_close(out[4], pooled["a#q"] + pooled["a#r"])
    torch.testing.assert_close(out[5], torch.cat([pooled["k#q"], pooled["k#r"]], 1))


def test_importance_weights_learn_through_the_collection():
    spec = feature("u", "multi_hash", num_hashes=2, importance_rows=8)
    group = FeatureGroupSpec("g", 4, (spec,))
    ebc = embedding_collection(group, torch.device("cpu"))
    rows = HashingIdMapper([spec])(kjt({"u": torch.tensor([11, 12, 13])}, 3))
    PooledCombiner([spec])(ebc(rows).to_dict())[0].square().sum().backward()
    grads = {name: p.grad for name, p in ebc.named_parameters()}
    assert grads["embedding_bags.u_weights.weight"].abs().sum() > 0
    assert grads["embedding_bags.u.weight"].abs().sum() > 0


def occupied_bins_variance(num_balls: float, num_bins: float) -> float:
    """Var[non-empty bins] after ``num_balls`` land uniformly and independently in
    ``num_bins`` bins (n bins, m balls; indicator I_j = bin j occupied):
    n (n-1) (1-2/n)^m + n (1-1/n)^m - n^2 (1-1/n)^(2m)."""
    n, m = float(num_bins), float(num_balls)
    empty_one = math.exp(m * math.log1p(-1.0 / n))
    empty_two = math.exp(m * math.log1p(-2.0 / n))
    return n * (n - 1) * empty_two + n * empty_one - n * n * empty_one * empty_one


def collision_rate_sd(feature_spec: FeatureSpec, num_ids: int) -> float:
    """Standard deviation of the measured collision rate 1 - occupied / num_ids under the
    same uniform model as feature_expected_collision_rate: the balls and bins each method
    throws (frequency: only the IDs beyond the frequent ones are hashed, into the rest)."""
    spec, rows = feature_spec.hashing, feature_spec.num_embeddings
    balls, bins = num_ids, rows
    if spec.method == "multi_hash":
        bins = rows**spec.num_hashes * max(1, spec.importance_rows)
    elif spec.method == "qr":
        bins = qr_virtual_size(feature_spec)
    elif spec.method == "frequency":
        balls, bins = num_ids - spec.frequent_ids.numel(), rows - spec.frequent_ids.numel()
    return math.sqrt(occupied_bins_variance(balls, bins)) / num_ids


COLLISION_CASES = [
    dict(method="hash", rows=5000),
    dict(method="modulo", rows=5000),
    dict(method="multi_hash", rows=150, num_hashes=2),
    dict(method="multi_hash", rows=60, num_hashes=2, importance_rows=7),
    dict(method="qr", rows=5000, id_space=20_000),
    dict(method="frequency", rows=5000, frequent_ids=torch.arange(1000) * 3 + 1),
]


def collision_case(spec: dict, lose_rows: float = 0.0):
    """(measured rate, expected rate, sd) for ~10^4 uniform distinct IDs; ``lose_rows``
    folds that fraction of the table's rows onto the others (a broken mapper)."""
    spec = dict(spec)
    rows, id_space = spec.pop("rows"), spec.pop("id_space", 10**9)
    method = spec.pop("method")
    hashed = feature("x", method, rows=rows, id_space=id_space, **spec)
    mapper = HashingIdMapper([hashed])
    generator = torch.Generator().manual_seed(5)
    num_ids = 10_000
    ids = torch.unique(torch.randint(INT64_MIN, INT64_MAX, (num_ids,), generator=generator))
    if method == "frequency":  # the head of the distribution is among the IDs seen
        ids = torch.unique(torch.cat([ids, hashed.hashing.frequent_ids]))
    signatures = mapper.feature_rows("x", ids)
    if lose_rows:
        signatures = signatures % int(rows * (1 - lose_rows))
    measured = measured_collision_rate(ids.numel(), distinct_signatures(signatures))
    expected = feature_expected_collision_rate(hashed, ids.numel())
    return measured, expected, collision_rate_sd(hashed, ids.numel())


@pytest.mark.parametrize(
    "spec", COLLISION_CASES,
    ids=lambda spec: spec["method"] + ("+weights" if spec.get("importance_rows") else ""),
)
def test_measured_collisions_match_balls_into_bins_on_uniform_ids(spec):
    """Within 5 standard deviations of the balls-into-bins expectation (the sd from the
    exact variance of the number of occupied bins: about 0.002 for hash at 10^4 IDs into
    5,000 rows; a false alarm about once in 1.7 million runs were the model exact)."""
    measured, expected, sd = collision_case(spec)
    assert expected > 0.05  # the test is about real collisions
    assert abs(measured - expected) < 5 * sd, (measured, expected, sd)


@pytest.mark.parametrize("method", ["hash", "modulo"])
def test_a_mapper_losing_5_percent_of_its_rows_fails_the_bound(method):
    measured, expected, sd = collision_case(dict(method=method, rows=5000), lose_rows=0.05)
    assert abs(measured - expected) > 5 * sd, (measured, expected, sd)


def test_none_and_dense_ids_do_not_collide_and_analytic_limits():
    dense = feature("n", "none", rows=1000, id_space=1000)
    assert feature_expected_collision_rate(dense) == 0.0
    ids = torch.arange(1000)
    assert distinct_signatures(HashingIdMapper([dense]).feature_rows("n", ids)) == 1000
    assert expected_collision_rate(1, 10) == 0.0
    assert abs(expected_collision_rate(1e9, 1e9) - 0.36788) < 1e-4  # 1/e of IDs share
    assert expected_collision_rate(2e9, 2e5) > 0.9998


def test_frequency_counts_are_ordered_and_deterministic():
    from modules.batch import Batch

    ids = torch.tensor([5, 3, 5, 9, 3, 5, 1, 9, 9, 9])
    batch = Batch(torch.zeros(10, 1), {"g": kjt({"a": ids}, 10)}, torch.zeros(10))
    counted = count_frequent_ids([batch, batch], top=3)
    assert counted["ids"]["a"].tolist() == [9, 5, 3]
    assert counted["counts"]["a"].tolist() == [8, 6, 4]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="multi_hash", num_hashes=0), "num_hashes (k) must be >= 1"),
        (dict(method="qr", q=1), "q must be >= 2"),
        (dict(method="qr", q=10**10), "is above the declared id_space"),
        (dict(method="modulo", rows=2 * 10**9), "buckets is above the declared id_space"),
        (dict(method="multi_hash", combine="mult"), "combine='mult' is not one of sum, concat"),
        (dict(method="frequency"), "needs a non-empty list of frequent IDs"),
        (dict(method="multi_hash", importance_rows=4, ids_per_sample=3), "need one ID per sample"),
    ],
)
def test_bad_specs_fail_naming_the_feature(kwargs, message):
    kwargs = dict(kwargs)
    rows, ids_per_sample = kwargs.pop("rows", 100), kwargs.pop("ids_per_sample", 1)
    with pytest.raises(ValueError, match="feature user_id") as error:
        feature("user_id", kwargs.pop("method"), rows=rows, id_space=10**9,
                ids_per_sample=ids_per_sample, **kwargs)
    assert message in str(error.value)


def test_hashed_methods_may_have_more_rows_than_ids():
    """Hashed IDs land on random rows, so rows above the ID space mean fewer collisions."""
    for method in ("hash", "multi_hash"):
        assert feature("user_id", method, rows=2 * 10**9, id_space=10**9).num_embeddings == 2 * 10**9


def test_importance_and_frequent_shares_follow_the_resized_tables(tmp_path):
    """hashing=multi_hash gives single-ID features ceil(share x rows) importance rows (none to
    multi-ID ones); hashing=full gives every listed ID its own row, leaving one row over."""
    from tests.helpers import compose_config
    from train.build import feature_groups
    from train.frequency_counts import save_frequency_file

    def features(overrides):
        config = compose_config([*TINY, *overrides])
        return {f.name: f for g in feature_groups(config.features, config.hashing)
                for f in g.features}

    weighted = features(["hashing=multi_hash", "hashing.compression_ratio=1000"])
    user_rows = weighted["user_id"].num_embeddings
    assert weighted["user_id"].hashing.importance_rows == math.ceil(0.5 * user_rows)
    assert weighted["user_interests"].hashing.importance_rows == 0  # 4 IDs per sample
    plain = features(["hashing=multi_hash", "hashing.importance_share=0"])
    assert plain["user_id"].hashing.importance_rows == 0

    listed = {"user_id": torch.arange(100), "site_id": torch.arange(24)}
    path = save_frequency_file(
        tmp_path / "f.pt", {"ids": listed, "counts": {k: v + 1 for k, v in listed.items()}},
        {"steps": 1, "ranks": 1, "batch_size": 1},
    )
    full = features(["hashing=full", f"hashing.frequency_file={path}",
                     "+hashing.features.ad_id.method=hash",
                     "+hashing.features.advertiser_id.method=hash",
                     "+hashing.features.user_interests.method=hash",
                     "+hashing.features.site_id.num_embeddings=30"])
    assert full["user_id"].num_embeddings == full["user_id"].id_space
    assert full["user_id"].hashing.frequent_ids.numel() == 100  # all listed
    assert full["site_id"].hashing.frequent_ids.numel() == 24  # more than half its 30 rows
