"""Synthetic click data with a planted signal, so a run can be judged against the truth.

Every sample is a pure function of (seed, split, rank, step, position): a resumed or
re-sharded run sees exactly the batches it would have seen, and ranks get independent
streams. No table of IDs is stored, whatever the ID space (2^40 users is fine):

* IDs: a popularity rank is drawn from a continuous Zipf-like law over [0, id_space) by
  inverse CDF, then (optionally) scrambled to a 63-bit raw ID by a bijective hash.
* Each raw ID's hidden latent vector and bias come from hashes of the ID, so they are the
  same wherever and whenever the ID appears.
* The planted logit is factorisation-machine shaped: a bias, per-feature ID biases, all
  pairwise dot products of the features' latent vectors, and a linear term of the dense
  features. Labels are Bernoulli(sigmoid(logit)).

The generator also returns the true click probability, so the Bayes-optimal AUC of the very
labels it drew can be reported next to the model's AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from modules.batch import Batch
from modules.features import FeatureGroupSpec, FeatureSpec, all_features
from modules.hash_functions import hash64, non_negative, seed_salt, uniform_from_hash

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class PlantedSignal:
    """Strength of each part of the planted logit (all terms are O(1) before weighting)."""

    latent_dim: int = 8
    pair_weight: float = 1.0
    id_bias_weight: float = 1.0
    dense_weight: float = 0.5
    bias: float = -1.0

    def __post_init__(self) -> None:
        if self.latent_dim <= 0:
            raise ValueError(f"planted latent_dim must be > 0, got {self.latent_dim}")


def zipf_ranks(uniforms: torch.Tensor, id_space: int, exponent: float) -> torch.Tensor:
    """Popularity ranks in [0, id_space) from float64 uniforms, by the inverse CDF of the
    continuous density x^-exponent on [1, id_space + 1).

    Args:
        uniforms: float64 [N] in [0, 1).
    Returns:
        int64 [N]; rank 0 is the most popular ID.
    """
    n_plus_1 = float(id_space) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = torch.exp(uniforms * math.log(n_plus_1))
    else:
        one_minus_s = 1.0 - exponent
        top = n_plus_1**one_minus_s
        x = ((top - 1.0) * uniforms + 1.0) ** (1.0 / one_minus_s)
    ranks = x.floor().to(torch.int64) - 1
    return ranks.clamp_(0, id_space - 1)


def gaussian_from_hash(ids: torch.Tensor, salt: int, num_values: int) -> torch.Tensor:
    """Deterministic standard-normal values per ID (Box-Muller over hashed uniforms).

    Args:
        ids: int64 [N].
    Returns:
        float32 [N, num_values], the same for the same (id, salt) everywhere.
    """
    lanes = torch.arange(2 * num_values, dtype=torch.int64, device=ids.device)
    hashed = hash64(ids.unsqueeze(1) * (2 * num_values) + lanes, salt)  # [N, 2V]
    uniforms = uniform_from_hash(hashed)
    u1 = uniforms[:, 0::2].clamp_min_(1e-7)
    u2 = uniforms[:, 1::2]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


class PlantedClickData:
    """Batches of planted-signal click data, one stream per (split, rank).

    Example::

        data = PlantedClickData(groups, num_dense_features=13, batch_size=512, seed=0)
        batch, click_probability = data.batch("train", rank=0, step=0)
    """

    def __init__(
        self,
        groups: list[FeatureGroupSpec],
        num_dense_features: int,
        batch_size: int,
        seed: int,
        signal: PlantedSignal | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if num_dense_features <= 0:
            raise ValueError(f"num_dense_features must be > 0, got {num_dense_features}")
        self.groups = groups
        self.features: list[FeatureSpec] = all_features(groups)
        self.num_dense_features = num_dense_features
        self.batch_size = batch_size
        self.seed = seed
        self.signal = signal or PlantedSignal()
        generator = torch.Generator().manual_seed(non_negative_seed(seed, "dense-weights"))
        self._dense_weights = torch.randn(num_dense_features, generator=generator) / math.sqrt(
            num_dense_features
        )
        num_features = len(self.features)
        self._pair_norm = 1.0 / math.sqrt(max(1, num_features * (num_features - 1) // 2))
        self._bias_norm = 1.0 / math.sqrt(num_features)

    def batch(self, split: str, rank: int, step: int) -> tuple[Batch, torch.Tensor]:
        """The batch of ``(split, rank, step)`` and its true click probabilities [B]."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        generator = torch.Generator().manual_seed(
            non_negative_seed(self.seed, split, rank, step)
        )
        num_samples = self.batch_size
        latent_dim = self.signal.latent_dim
        latent_sum = torch.zeros(num_samples, latent_dim)
        latent_square_norms = torch.zeros(num_samples)
        id_bias = torch.zeros(num_samples)
        raw_ids_by_feature: dict[str, torch.Tensor] = {}
        for feature in self.features:
            count = num_samples * feature.ids_per_sample
            uniforms = torch.rand(count, generator=generator, dtype=torch.float64)
            ranks = zipf_ranks(uniforms, feature.id_space, feature.zipf_exponent)
            feature_salt = seed_salt(self.seed, "feature", feature.name)
            raw_ids = non_negative(hash64(ranks, feature_salt)) if feature.scramble_ids else ranks
            raw_ids_by_feature[feature.name] = raw_ids
            if feature.signal_weight == 0.0:
                continue
            values = gaussian_from_hash(raw_ids, feature_salt, latent_dim + 1)
            values = values.view(num_samples, feature.ids_per_sample, latent_dim + 1).mean(1)
            latent = values[:, :latent_dim] * (feature.signal_weight / math.sqrt(latent_dim))
            latent_sum += latent
            latent_square_norms += latent.square().sum(1)
            id_bias += values[:, latent_dim] * feature.signal_weight
        # Sum over feature pairs f < g of <z_f, z_g>, without the F^2 loop.
        pair_term = 0.5 * (latent_sum.square().sum(1) - latent_square_norms)
        dense = torch.randn(num_samples, self.num_dense_features, generator=generator)
        logit = (
            self.signal.bias
            + self.signal.pair_weight * self._pair_norm * pair_term
            + self.signal.id_bias_weight * self._bias_norm * id_bias
            + self.signal.dense_weight * (dense @ self._dense_weights)
        )
        click_probability = torch.sigmoid(logit)
        labels = (torch.rand(num_samples, generator=generator) < click_probability).float()
        batch = Batch(
            dense_features=dense,
            sparse_features={
                group.name: self._group_kjt(group, raw_ids_by_feature, num_samples)
                for group in self.groups
            },
            labels=labels,
        )
        return batch, click_probability

    @staticmethod
    def _group_kjt(
        group: FeatureGroupSpec, raw_ids: dict[str, torch.Tensor], num_samples: int
    ) -> KeyedJaggedTensor:
        values = torch.cat([raw_ids[feature.name] for feature in group.features])
        lengths = torch.cat(
            [
                torch.full((num_samples,), feature.ids_per_sample, dtype=torch.int32)
                for feature in group.features
            ]
        )
        return KeyedJaggedTensor(keys=group.feature_names, values=values, lengths=lengths)


def non_negative_seed(*parts: int | str) -> int:
    """A torch.Generator seed (non-negative int64) from a tuple of ints and strings."""
    return seed_salt(*parts) & ((1 << 63) - 1)
