"""Agent addresses and the agent-id → shard function.

The shard function is part of the public wire protocol (docs/protocol.md): CRC-32 (IEEE) of the
UTF-8 string form `type/key`, modulo the cluster's shard count.
"""

from __future__ import annotations

import re
import zlib

import msgspec

from ._errors import ConfigurationError

_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_MAX_KEY = 512


class AgentId(msgspec.Struct, frozen=True, order=True):
    """The name of a virtual agent: its type and its key. String form `type/key`."""

    type: str
    key: str

    def __post_init__(self) -> None:
        validate_agent_type(self.type)
        if not self.key or len(self.key) > _MAX_KEY:
            raise ConfigurationError(
                f"agent key must be 1..{_MAX_KEY} characters, got {self.key!r}"
            )

    def __str__(self) -> str:
        return f"{self.type}/{self.key}"

    @classmethod
    def parse(cls, text: str) -> AgentId:
        """Parse `type/key`; the key may itself contain `/`."""
        agent_type, sep, key = text.partition("/")
        if not sep:
            raise ConfigurationError(f"agent id must look like 'type/key', got {text!r}")
        return cls(agent_type, key)


def validate_agent_type(name: str) -> str:
    if not _TYPE_RE.fullmatch(name):
        raise ConfigurationError(
            f"agent type must be lowercase letters, digits, '_' or '-' (max 63), got {name!r}"
        )
    return name


def shard_of(agent_id: AgentId | str, num_shards: int) -> int:
    """The shard an agent lives in: crc32(utf8('type/key')) mod num_shards."""
    return zlib.crc32(str(agent_id).encode()) % num_shards


def snake_case(name: str) -> str:
    """`OrderBook` → `order_book`: the default agent type name of a class."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def as_agent_id(target: AgentId | str) -> AgentId:
    if isinstance(target, AgentId):
        return target
    if isinstance(target, str):
        return AgentId.parse(target)
    raise ConfigurationError(f"target must be an AgentId or 'type/key', got {target!r}")


class Targets:
    """Target → (agent id, shard), with parsed strings cached: resolving is on the hot path."""

    def __init__(self, num_shards: int, limit: int = 50_000) -> None:
        self._n = num_shards
        self._limit = limit
        self._cache: dict[str, tuple[AgentId, int]] = {}

    def resolve(self, target: AgentId | str) -> tuple[AgentId, int]:
        if isinstance(target, str):
            hit = self._cache.get(target)
            if hit is None:
                agent_id = as_agent_id(target)
                if len(self._cache) > self._limit:
                    self._cache.clear()
                hit = self._cache[target] = (agent_id, shard_of(agent_id, self._n))
            return hit
        agent_id = as_agent_id(target)
        return agent_id, shard_of(agent_id, self._n)
