"""Vectorised 64-bit hashing over int64 tensors, in plain torch ops.

fbgemm's ``murmur_hash3`` is scalar-only on CPU (and overflows for half of all inputs), so
hashrec hashes with torch integer ops that run unchanged on CPU and CUDA. torch has no
unsigned 64-bit arithmetic, so we keep the bits in int64: multiplication wraps modulo 2^64
(two's complement), and a *logical* right shift is emulated as an arithmetic shift followed by
a mask that clears the sign-extended bits.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _as_signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _as_signed(0x9E3779B97F4A7C15)
_MIX1 = _as_signed(0xBF58476D1CE4E5B9)
_MIX2 = _as_signed(0x94D049BB133111EB)


def logical_shift_right(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x >>> shift`` on the 64 bits of an int64 tensor (zero fill, not sign fill)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014) applied element-wise.

    A bijection on 64-bit values with full avalanche: sequential or strided IDs come out
    uniformly spread, which plain modulo does not give.

    Args:
        x: int64 tensor of any shape.
    Returns:
        int64 tensor of the same shape, the bits of the unsigned 64-bit hash.
    """
    z = x + _GOLDEN
    z = (z ^ logical_shift_right(z, 30)) * _MIX1
    z = (z ^ logical_shift_right(z, 27)) * _MIX2
    return z ^ logical_shift_right(z, 31)


def splitmix64_int(value: int) -> int:
    """Plain-Python splitmix64 of one integer, returned as an unsigned 64-bit int."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_salt(*parts: int | str) -> int:
    """Fold integers and strings into one signed 64-bit salt, deterministic across runs."""
    acc = 0
    for part in parts:
        if isinstance(part, str):
            for byte in part.encode():
                acc = splitmix64_int(acc ^ byte)
        else:
            acc = splitmix64_int(acc ^ (part & _MASK64))
    return _as_signed(acc)


def hash64(x: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Seeded 64-bit hash: ``splitmix64(x xor salt)``; different salts give independent hashes."""
    return splitmix64(x ^ _as_signed(salt))


def non_negative(h: torch.Tensor) -> torch.Tensor:
    """Keep the low 63 bits, so the result is a non-negative int64 (safe for ``%``)."""
    return h & ((1 << 63) - 1)


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """Map 64-bit hashes to float32 uniforms in [0, 1) using their top 24 bits."""
    return logical_shift_right(h, 40).to(torch.float32) * (1.0 / (1 << 24))
