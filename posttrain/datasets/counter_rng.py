"""A counter-based random stream whose whole state is one integer.

Shuffle buffers, file orders and the mixer draw from it: resuming needs only the number of draws made,
never a replay, and the same key gives the same numbers in every process.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key_of(parts: tuple) -> int:
    key = 0x5EED
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(part.encode()[:8].ljust(8, b"\0"), "little") ^ len(part)
        key = _splitmix64(key ^ (int(part) & _MASK64))
    return key


class CounterRNG:
    """`CounterRNG(seed, "shuffle", epoch, ...)`: draw k is a pure function of (key, k)."""

    def __init__(self, *key_parts: int | str, draws: int = 0) -> None:
        self.key = _key_of(key_parts)
        self.draws = draws

    def next_u64(self) -> int:
        value = _splitmix64(self.key ^ _splitmix64(self.draws))
        self.draws += 1
        return value

    def randbelow(self, n: int) -> int:
        """Uniform integer in [0, n) (bias below 2**-40 for any n a buffer can have)."""
        return self.next_u64() % n

    def random(self) -> float:
        """Uniform float in [0, 1)."""
        return (self.next_u64() >> 11) / float(1 << 53)

    def permutation(self, n: int) -> list[int]:
        order = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.randbelow(i + 1)
            order[i], order[j] = order[j], order[i]
        return order
