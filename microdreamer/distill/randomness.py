"""The random numbers of a distillation run, keyed so that any step can be replayed on its own.

Every draw for the sample at position j of the global batch at step s comes from a ``torch.Generator``
seeded by a hash of (seed, "sample", s, j), and the data order is one permutation per epoch seeded by
(seed, "epoch", e). So a resumed run makes exactly the draws it would have made without stopping, and what a
sample sees does not depend on how the global batch is split across processes. No global RNG is used.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch


def keyed_seed(seed: int, *key: int | str) -> int:
    """The first 63 bits of sha256 of (seed, *key)."""
    digest = hashlib.sha256(repr((int(seed), *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(seed: int, *key: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`keyed_seed` of (seed, *key)."""
    return torch.Generator().manual_seed(keyed_seed(seed, *key))


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` of the global batch of ``step``."""
    return keyed_generator(seed, "sample", step, position)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> tuple[int, ...]:
    return tuple(torch.randperm(count, generator=keyed_generator(seed, "epoch", epoch)).tolist())


def batch_items(seed: int, step: int, global_batch: int, count: int) -> list[int]:
    """Dataset indices of the global batch of ``step`` (1-based): positions (step−1)·G … step·G − 1 of the
    concatenated epoch permutations of ``count`` items (a batch may straddle two epochs)."""
    positions = range((step - 1) * global_batch, step * global_batch)
    return [_epoch_order(seed, p // count, count)[p % count] for p in positions]
