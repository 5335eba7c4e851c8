"""Shard placement: rendezvous (highest-random-weight) hashing with bounded load.

Every node computes the same assignment from the same live set, so no coordinator is needed;
leases, not this function, guarantee a single owner.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

LOAD_FACTOR = 1.25


def weight(shard: int, node: str) -> int:
    digest = hashlib.blake2b(f"{shard}:{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(shard: int, nodes: Sequence[str]) -> list[str]:
    """Nodes in preference order for `shard`."""
    return sorted(nodes, key=lambda n: weight(shard, n), reverse=True)


def capacity(num_shards: int, num_nodes: int, c: float = LOAD_FACTOR) -> int:
    return math.ceil(c * num_shards / num_nodes)


def assign(num_shards: int, nodes: Sequence[str], c: float = LOAD_FACTOR) -> dict[int, str]:
    """Desired owner of every shard: its top-ranked node that is still under capacity."""
    if not nodes:
        return {}
    cap = capacity(num_shards, len(nodes), c)
    load = dict.fromkeys(nodes, 0)
    out: dict[int, str] = {}
    for shard in range(num_shards):
        for node in rank(shard, nodes):
            if load[node] < cap:
                load[node] += 1
                out[shard] = node
                break
    return out
