"""Synthetic click data with a planted signal, so a run can be judged against the truth.

Every sample is a pure function of (seed, split, rank, step, position): a resumed or
re-sharded run sees exactly the batches it would have seen, and ranks get independent
streams. No table of IDs is stored, whatever the ID space (2^40 users is fine):

* IDs: a popularity rank is drawn from a continuous Zipf-like law over [0, id_space) by
  inverse CDF, then (optionally) scrambled to a 63-bit raw ID by a bijective hash.
* Each raw ID's hidden latent vector and bias are drawn from hashes of the ID itself (16 bits
  per value, uniform with unit variance), so they are the same wherever and whenever the ID
  appears, and two distinct IDs of a feature get distinct vectors whatever the ID space: a
  billion users really are a billion users, up to a 2^-64 chance per pair.
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

from modules.batch import Batch, host_kjt
from modules.features import FeatureGroupSpec, FeatureSpec, all_features
from modules.hash_functions import non_negative, seed_salt, splitmix64

SPLITS = ("train", "eval")
# Each 64-bit hash of an ID gives this many latent values of 16 bits each.
_VALUES_PER_HASH = 4
_UNIFORM_SCALE = math.sqrt(12.0)  # a uniform on [-1/2, 1/2) times this has unit variance


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


class ZipfLaw:
    """Inverse CDF of the continuous density x^-s on [1, N + 1), giving popularity ranks in
    [0, N). N and s may be per-element tensors (one law per ID slot of a batch) or scalars;
    the constants are computed once, so drawing is a few elementwise ops."""

    def __init__(self, id_space: torch.Tensor | int, exponent: torch.Tensor | float) -> None:
        self.id_space = torch.as_tensor(id_space, dtype=torch.int64)
        exponent = torch.as_tensor(exponent, dtype=torch.float64)
        self.log_law = (exponent - 1.0).abs() < 1e-9  # s = 1: x = (N + 1)^u
        one_minus_s = torch.where(self.log_law, 1.0, 1.0 - exponent)
        self.log_top = torch.log(self.id_space.double() + 1.0)
        self.top_minus_1 = torch.pow(self.id_space.double() + 1.0, one_minus_s) - 1.0
        self.inverse_power = 1.0 / one_minus_s

    def ranks(self, uniforms: torch.Tensor) -> torch.Tensor:
        """float64 uniforms in [0, 1) -> int64 ranks; rank 0 is the most popular ID."""
        power_law = (self.top_minus_1 * uniforms + 1.0) ** self.inverse_power
        x = torch.where(self.log_law, torch.exp(uniforms * self.log_top), power_law)
        return torch.minimum((x.floor().to(torch.int64) - 1).clamp_(min=0), self.id_space - 1)


def zipf_ranks(uniforms: torch.Tensor, id_space: int, exponent: float) -> torch.Tensor:
    """Popularity ranks in [0, id_space) of one Zipf-like law (see ZipfLaw).

    Args:
        uniforms: float64 [N] in [0, 1).
    Returns:
        int64 [N]; rank 0 is the most popular ID.
    """
    return ZipfLaw(id_space, exponent).ranks(uniforms)


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
        # Each ID's hidden latent vector and bias come from salted hashes of the ID: one per
        # four values (see latent_values).
        num_values = self.signal.latent_dim + 1
        self._latent_salts = [
            seed_salt(seed, "latent", index)
            for index in range(math.ceil(num_values / _VALUES_PER_HASH))
        ]
        num_features = len(self.features)
        self._pair_norm = 1.0 / math.sqrt(max(1, num_features * (num_features - 1) // 2))
        self._bias_norm = 1.0 / math.sqrt(num_features)
        self._build_layout()

    def _build_layout(self) -> None:
        """Per-ID constants of a batch, laid out like the batch's values: all features one
        after the other (group order, feature order), each B x ids_per_sample long. A batch
        is then a handful of vectorised ops, whatever the number of features."""
        B = self.batch_size
        counts = [B * f.ids_per_sample for f in self.features]

        def per_id(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), torch.tensor(counts))

        self._zipf = ZipfLaw(
            per_id([f.id_space for f in self.features], torch.int64),
            per_id([f.zipf_exponent for f in self.features], torch.float64),
        )
        self._salt = per_id(
            [seed_salt(self.seed, "feature", f.name) for f in self.features], torch.int64
        )
        self._scramble = per_id([f.scramble_ids for f in self.features], torch.bool)
        # Pooling: ID i belongs to segment (feature, sample); each segment averages its IDs.
        self._segment = torch.cat(
            [
                index * B + torch.arange(B).repeat_interleave(f.ids_per_sample)
                for index, f in enumerate(self.features)
            ]
        )
        self._one_hot = all(f.ids_per_sample == 1 for f in self.features)
        self._ids_per_segment = torch.tensor(
            [float(f.ids_per_sample) for f in self.features]
        ).repeat_interleave(B).unsqueeze(1)
        self._feature_weight = torch.tensor([f.signal_weight for f in self.features]).view(-1, 1, 1)
        # The KJT of a group is a contiguous slice of the values; its lengths never change.
        self._group_slices: list[tuple[FeatureGroupSpec, int, int, torch.Tensor, list[int]]] = []
        start = 0
        for group in self.groups:
            length_per_key = [B * f.ids_per_sample for f in group.features]
            size = sum(length_per_key)
            lengths = torch.cat(
                [torch.full((B,), f.ids_per_sample, dtype=torch.int32) for f in group.features]
            )
            self._group_slices.append((group, start, start + size, lengths, length_per_key))
            start += size

    def _raw_ids(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Zipf-like popularity ranks (inverse CDF, per-ID law), then optional scrambling."""
        ranks = self._zipf.ranks(uniforms)
        scrambled = non_negative(splitmix64(ranks ^ self._salt))
        return torch.where(self._scramble, scrambled, ranks)

    def latent_values(self, salted_ids: torch.Tensor) -> torch.Tensor:
        """The hidden [latent vector, bias] of each (feature-salted) ID: float32 [T, d + 1].

        Each value is 16 bits of a salted splitmix64 of the ID, as a signed int16 (centred),
        scaled to unit variance. Distinct IDs share a vector only if all their hashes collide.
        A table of random vectors picked by hash would be faster to read but bounds the
        distinct vectors by its rows, whatever the ID space (the planted truth would then be
        coarser than the hashed tables measured against it).
        """
        words = torch.stack([splitmix64(salted_ids ^ salt) for salt in self._latent_salts], 1)
        # Each int64 word read as four int16s: the same bits on every little-endian machine.
        values = words.view(torch.int16)[:, : self.signal.latent_dim + 1]
        return (values.to(torch.float32) + 0.5).mul_(_UNIFORM_SCALE / 65536)

    def batch(self, split: str, rank: int, step: int) -> tuple[Batch, torch.Tensor]:
        """The batch of ``(split, rank, step)`` and its true click probabilities [B]."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        generator = torch.Generator().manual_seed(
            non_negative_seed(self.seed, split, rank, step)
        )
        num_samples = self.batch_size
        num_features = len(self.features)
        latent_dim = self.signal.latent_dim
        uniforms = torch.rand(self._salt.numel(), generator=generator, dtype=torch.float64)
        raw_ids = self._raw_ids(uniforms)
        values = self.latent_values(raw_ids ^ self._salt)  # [T, d + 1]
        if not self._one_hot:  # average each sample's bag
            pooled = torch.zeros(num_features * num_samples, latent_dim + 1)
            values = pooled.index_add_(0, self._segment, values) / self._ids_per_segment
        values = values.view(num_features, num_samples, latent_dim + 1) * self._feature_weight
        latent = values[..., :latent_dim] * (1.0 / math.sqrt(latent_dim))  # [F, B, d]
        # Sum over feature pairs f < g of <z_f, z_g>, without the F^2 loop.
        pair_term = 0.5 * (latent.sum(0).square().sum(1) - latent.square().sum((0, 2)))
        id_bias = values[..., latent_dim].sum(0)
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
                group.name: host_kjt(group.feature_names, raw_ids[start:stop], lengths,
                                     length_per_key, num_samples)
                for group, start, stop, lengths, length_per_key in self._group_slices
            },
            labels=labels,
        )
        return batch, click_probability


def non_negative_seed(*parts: int | str) -> int:
    """A torch.Generator seed (non-negative int64) from a tuple of ints and strings."""
    return seed_salt(*parts) & ((1 << 63) - 1)
