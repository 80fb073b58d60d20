"""The torch 64-bit hash against an independent plain-Python splitmix64, and its uniformity
where plain modulo fails (sequential and strided IDs)."""

from __future__ import annotations

import pytest
import torch

from modules.hash_functions import hash64, non_negative, seed_salt, splitmix64

MASK64 = (1 << 64) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def reference_splitmix64(x: int) -> int:
    """splitmix64's output function as published (Steele, Lea, Flood 2014; Vigna's C code),
    over Python's unbounded ints, returning the unsigned 64-bit result. Written here, apart
    from modules/, so a shared mistake cannot hide."""
    z = (x + 0x9E3779B97F4A7C15) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return z ^ (z >> 31)


def as_unsigned(tensor: torch.Tensor) -> list[int]:
    return [value & MASK64 for value in tensor.tolist()]


ADVERSARIAL = [0, 1, -1, 2, -2, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1,
               1 << 32, (1 << 32) - 1, -(1 << 32), 0x9E3779B97F4A7C15 - (1 << 64)]


def test_known_answers_of_the_published_generator():
    # SplitMix64 seeded with 0 yields these three outputs (state += golden gamma, then mix);
    # splitmix64(x) mixes x + gamma, so outputs n = splitmix64(n * gamma).
    gamma = 0x9E3779B97F4A7C15
    def signed(value: int) -> int:
        return value - (1 << 64) if value >= (1 << 63) else value

    states = torch.tensor([signed((n * gamma) & MASK64) for n in range(3)])
    assert as_unsigned(splitmix64(states)) == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F
    ]


@pytest.mark.parametrize("salt", [0, 1, seed_salt(7, "x"), INT64_MIN])
def test_matches_reference_on_random_and_adversarial_inputs(salt):
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(INT64_MIN, INT64_MAX, (2000,), generator=generator, dtype=torch.int64)
    sequential = torch.arange(-500, 500, dtype=torch.int64)
    strided = torch.arange(0, 1000, dtype=torch.int64) * (1 << 20)
    inputs = torch.cat([torch.tensor(ADVERSARIAL, dtype=torch.int64), random, sequential, strided])
    expected = [reference_splitmix64((x ^ salt) & MASK64) for x in inputs.tolist()]
    assert as_unsigned(hash64(inputs, salt)) == expected


def test_different_salts_give_unrelated_hashes():
    ids = torch.arange(10_000, dtype=torch.int64)
    a = non_negative(hash64(ids, seed_salt(0, "a"))) % 1000
    b = non_negative(hash64(ids, seed_salt(0, "b"))) % 1000
    assert float((a == b).float().mean()) < 0.01  # independent: ~1/1000 agree


def chi_square(buckets: torch.Tensor, num_buckets: int) -> float:
    counts = torch.bincount(buckets, minlength=num_buckets).double()
    expected = buckets.numel() / num_buckets
    return float(((counts - expected) ** 2 / expected).sum())


# df = 1023: mean 1023, sd ~45; 1023 + 6 sd bounds a uniform hash (fixed inputs: no flakes).
NUM_BUCKETS = 1024
CHI_SQUARE_LIMIT = NUM_BUCKETS - 1 + 6 * (2 * (NUM_BUCKETS - 1)) ** 0.5


@pytest.mark.parametrize(
    "name,ids",
    [
        ("sequential", torch.arange(200_000, dtype=torch.int64)),
        ("strided by 1024", torch.arange(200_000, dtype=torch.int64) * 1024),
        ("strided by 2^32", torch.arange(200_000, dtype=torch.int64) << 32),
        ("large sequential", torch.arange(200_000, dtype=torch.int64) + (1 << 62)),
    ],
)
def test_hash_is_uniform_where_modulo_fails(name, ids):
    hashed = non_negative(hash64(ids, seed_salt(0, "uniformity"))) % NUM_BUCKETS
    assert chi_square(hashed, NUM_BUCKETS) < CHI_SQUARE_LIMIT, name
    if name.startswith("strided"):
        # Plain modulo puts every strided ID in bucket 0.
        assert chi_square(torch.remainder(ids, NUM_BUCKETS), NUM_BUCKETS) > 100 * CHI_SQUARE_LIMIT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    generator = torch.Generator().manual_seed(1)
    ids = torch.cat([
        torch.tensor(ADVERSARIAL, dtype=torch.int64),
        torch.randint(INT64_MIN, INT64_MAX, (100_000,), generator=generator, dtype=torch.int64),
    ])
    salt = seed_salt(3, "cuda")
    assert torch.equal(hash64(ids.cuda(), salt).cpu(), hash64(ids, salt))
