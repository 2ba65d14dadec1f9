"""Counter-based seeds and permutations that are stable across processes, Python and library versions.

Every random decision of the data layer is a pure function of explicit counters (seed, epoch, slot, window,
sample key...). Python's ``hash()`` is salted per process and ``random``/``torch`` streams depend on how many
draws happened before, so neither is used for ordering: we hash with BLAKE2b and expand with SplitMix64.
"""

from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the ``str`` of each part (BLAKE2b); equal parts give equal seeds everywhere."""
    # surrogatepass: a key from a non-UTF-8 tar member name holds lone surrogates (surrogateescape); they hash
    # as fixed bytes instead of failing. Valid text encodes exactly as plain UTF-8, so other seeds are unchanged.
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def permutation(n: int, seed: int) -> list[int]:
    """A uniformly random permutation of ``range(n)`` (Fisher-Yates driven by SplitMix64 from ``seed``)."""
    order = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        state, r = _splitmix64(state)
        j = r % (i + 1)  # modulo bias is < (i + 1) / 2**64, irrelevant here
        order[i], order[j] = order[j], order[i]
    return order


def uniform_index(n: int, seed: int) -> int:
    """One index in ``range(n)`` drawn from ``seed``."""
    return _splitmix64(seed)[1] % n


def make_generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
