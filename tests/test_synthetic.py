"""Planted data: a pure function of (seed, split, rank, step), independent streams, sane
Bayes AUC, and Zipf-like popularity without a table of IDs."""

from __future__ import annotations

import itertools

import torch

from modules.features import FeatureGroupSpec, FeatureSpec
from modules.metrics import auc
from modules.synthetic import PlantedClickData, zipf_ranks

GROUPS = [
    FeatureGroupSpec(
        "user",
        8,
        (
            FeatureSpec("user_id", id_space=2**40, num_embeddings=1000, zipf_exponent=1.1),
            FeatureSpec("interests", id_space=500, num_embeddings=500, ids_per_sample=3),
        ),
    ),
    FeatureGroupSpec(
        "ad", 8, (FeatureSpec("ad_id", id_space=10**8, num_embeddings=1000, zipf_exponent=1.2),)
    ),
]


def data(seed=0, batch_size=512):
    return PlantedClickData(GROUPS, num_dense_features=4, batch_size=batch_size, seed=seed)


def test_batches_are_a_pure_function_of_seed_split_rank_step():
    first, p1 = data().batch("train", 1, 7)
    again, p2 = data().batch("train", 1, 7)
    assert torch.equal(first.labels, again.labels)
    assert torch.equal(p1, p2)
    assert torch.equal(first.dense_features, again.dense_features)
    for group in first.sparse_features:
        assert torch.equal(first.sparse_features[group].values(), again.sparse_features[group].values())
    other_seed, _ = data(seed=1).batch("train", 1, 7)
    assert not torch.equal(first.dense_features, other_seed.dense_features)


def sample_ids(batch) -> torch.Tensor:
    """[B, total IDs per sample]: every feature's IDs of each sample, side by side."""
    columns = []
    for kjt in batch.sparse_features.values():
        for name in kjt.keys():
            jagged = kjt[name]
            columns.append(jagged.values().view(jagged.lengths().numel(), -1))
    return torch.cat(columns, 1)


def assert_independent_streams(batches: dict) -> None:
    """No sample of one stream reappears in another, in any of its parts."""
    for (key, one), (other_key, other) in itertools.combinations(batches.items(), 2):
        where = f"{key} vs {other_key}"
        # Dense rows: continuous draws, so a shared row would mean shared draws (single
        # float32 values do coincide by chance: 2^24 of them per octave).
        rows = torch.cat([one.dense_features, other.dense_features])
        assert torch.unique(rows, dim=0).shape[0] == rows.shape[0], where
        # IDs: popular IDs recur (Zipf), so a column agrees at ~3% of positions by chance
        # (measured: 0.4-4.3% at B=512); a stream reusing another's ID draws agrees at 100%.
        ids, other_ids = sample_ids(one), sample_ids(other)
        assert (ids == other_ids).float().mean(0).max() < 0.2, where
        assert not (ids == other_ids).all(1).any(), where  # a whole sample's IDs
        # Labels: independent Bernoulli(~0.3) draws agree at p^2 + (1-p)^2 ~ 0.58 (sd 0.022).
        assert (one.labels == other.labels).float().mean() < 0.8, where


def test_rank_and_split_streams_are_independent():
    """What the generator guarantees: each (seed, split, rank, step) seeds its own torch
    generator (a 63-bit hash of the tuple), which draws all of that batch, its IDs, dense
    features and labels. Two streams therefore share no draws: their samples are independent,
    never copies, although popular IDs recur in both (as they do in real logs: the streams are
    not disjoint in the set of IDs, only in the draws)."""
    source = data()
    keys = [("train", 0, 0), ("train", 1, 0), ("train", 0, 1), ("eval", 0, 0)]
    assert_independent_streams({key: source.batch(*key)[0] for key in keys})


def test_kjt_layout_and_id_ranges():
    batch, _ = data().batch("train", 0, 0)
    user = batch.sparse_features["user"]
    assert user.keys() == ["user_id", "interests"]
    assert user["interests"].lengths().eq(3).all()
    assert user["user_id"].values().min() >= 0  # scrambled IDs are non-negative 63-bit values
    assert user["user_id"].values().max() > 2**40  # ...spread over the whole int64 range


def test_bayes_auc_is_sane_and_beats_a_wrong_model():
    source = data(batch_size=4096)
    batch, probability = source.batch("eval", 0, 0)
    bayes = auc(probability, batch.labels)
    assert 0.65 < bayes < 0.95
    noisy = probability + 0.3 * torch.randn(probability.shape, generator=torch.Generator().manual_seed(3))
    assert auc(noisy, batch.labels) < bayes
    assert 0.1 < float(batch.labels.mean()) < 0.6


def test_zipf_ranks_are_skewed_and_in_range():
    uniforms = torch.rand(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ranks = zipf_ranks(uniforms, 2**40, 1.1)
    assert ranks.min() >= 0 and ranks.max() < 2**40
    # The most popular rank is drawn far more often than rank 100.
    assert (ranks == 0).sum() > 20 * (ranks == 100).sum()
    small = zipf_ranks(uniforms, 10, 0.3)
    assert set(small.tolist()) == set(range(10))


def test_distinct_ids_get_distinct_hidden_vectors_beyond_a_million():
    """A billion-user experiment must have a billion distinct users: the planted truth of
    2^21 + 1 distinct IDs (twice what a 2^20-slot table of vectors could hold) is 2^21 + 1
    distinct vectors, each value of unit variance around 0."""
    planted = data(seed=3, batch_size=8)
    ids = torch.arange((1 << 21) + 1, dtype=torch.int64) * 7919 + 12345
    values = planted.latent_values(ids)
    assert values.shape == (ids.numel(), planted.signal.latent_dim + 1)
    assert torch.unique(values, dim=0).shape[0] == ids.numel()
    # Mean within 5 standard errors of 0, variance within 1% of 1 (n = 18.9M values).
    flat = values.double().flatten()
    assert abs(float(flat.mean())) < 5 / flat.numel() ** 0.5
    assert abs(float(flat.var()) - 1.0) < 0.01
