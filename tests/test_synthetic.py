"""Planted data: a pure function of (seed, split, rank, step), disjoint rank streams, sane
Bayes AUC, and Zipf-like popularity without a table of IDs."""

from __future__ import annotations

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


def test_rank_and_split_streams_are_disjoint():
    source = data()
    dense = {
        key: source.batch(split, rank, step)[0].dense_features
        for key in [("train", 0, 0), ("train", 1, 0), ("train", 0, 1), ("eval", 0, 0)]
        for split, rank, step in [key]
    }
    rows = torch.cat(list(dense.values()))
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


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
