"""Seeded randomized orthogonal matrices with a fast structured product, for Hadamard-style rotations.

A Hadamard matrix exists only for sizes 1, 2 and multiples of 4, and Sylvester's construction (the one that
is cheap to build and apply) only for powers of 2. Hidden sizes like SmolLM2's 576 = 64·9 or its
intermediate 1536 = 512·3 are not powers of 2, so the matrix used for a size n = 2^k·m (m odd) is

    Q = diag(s) · (H_{2^k} ⊗ R_m)

with s random signs, H the normalized Sylvester Hadamard matrix and R_m a Haar-random orthogonal matrix
(QR of a Gaussian matrix with the sign fix), all drawn from one seed. Q is orthogonal; every row of the
Hadamard factor spreads a single outlier channel evenly over 2^k channels and R_m mixes the rest, so the
incoherence that QuaRot relies on is kept, and x·Q costs a (2^k × 2^k) and an (m × m) product instead of a
dense (n × n) one. For a power of 2, m = 1 and Q is the randomized Hadamard matrix of QuaRot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The normalized (orthogonal) n × n Hadamard matrix, n a power of 2, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed random orthogonal n × n matrix (float64)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)).contiguous()


def split_pow2(n: int) -> tuple[int, int]:
    """n = 2^k · m with m odd; returns (2^k, m)."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    pow2 = n & -n
    return pow2, n // pow2


@dataclass
class KroneckerRotation:
    """Q = diag(signs) · (hadamard ⊗ small); `matrix()` for folding into weights, `apply` for online use."""

    signs: torch.Tensor  # (n,) ±1, float64
    hadamard: torch.Tensor  # (2^k, 2^k) normalized Sylvester Hadamard, float64 (symmetric)
    small: torch.Tensor  # (m, m) orthogonal, float64
    _cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, repr=False
    )

    @property
    def size(self) -> int:
        return int(self.signs.numel())

    def describe(self) -> str:
        """e.g. 'diag(±1)·(H64 ⊗ R9)', for the results."""
        return f"diag(±1)·(H{self.hadamard.shape[0]} ⊗ R{self.small.shape[0]})"

    def matrix(self) -> torch.Tensor:
        """The dense n × n float64 matrix (rows indexed by input channel: y = x @ Q)."""
        return self.signs[:, None] * torch.kron(self.hadamard, self.small)

    def _factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = tuple(
                t.to(dtype=dtype, device=device) for t in (self.signs, self.hadamard, self.small)
            )
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q over the last dimension, in x's dtype, using the Kronecker structure (x is not modified).

        With x viewed as X (a × m) per row, x (H ⊗ R) = Hᵀ X R, and H is symmetric."""
        signs, h, r = self._factors(x.dtype, x.device)
        a, m = h.shape[0], r.shape[0]
        lead = x.shape[:-1]
        y = (x * signs).reshape(-1, a, m)
        if m > 1:
            y = y @ r
        y = (y.transpose(1, 2) @ h).transpose(1, 2)
        return y.reshape(*lead, a * m)


def randomized_rotation(n: int, seed: int) -> KroneckerRotation:
    """The seeded n × n rotation described in the module docstring."""
    gen = torch.Generator().manual_seed(int(seed))
    pow2, odd = split_pow2(n)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)
    small = haar_orthogonal(odd, gen) if odd > 1 else torch.ones(1, 1, dtype=torch.float64)
    return KroneckerRotation(signs=signs, hadamard=sylvester_hadamard(pow2), small=small)
