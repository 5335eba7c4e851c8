"""The directory of a cluster as a client needs it: each agent type's delivery mode, failover
strategy and whether it is a worker pool (published by the nodes that host it, in the meta
bucket) and the topic subscriptions, both from locally cached, watched copies of their buckets."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from ._errors import ConfigurationError
from ._ids import AgentId, validate_agent_type
from ._spec import DELIVERY_MODES, AgentSpec, known_spec
from .cluster._watched import WatchedKV


class Directory:
    def __init__(
        self,
        types: WatchedKV,
        subs: WatchedKV,
        local_spec: Callable[[str], AgentSpec | None],
    ) -> None:
        # "type.<agent type>" -> {"delivery": ..., "failover": ..., "stateless": ...}
        self._types = types
        self._subs = subs  # "<topic>.<agent type>" -> b"1"
        self._local_spec = local_spec  # the spec of a type hosted in this process
        self._mode_cache: dict[bytes, str] = {}
        self._pool_cache: dict[bytes, bool] = {}

    def known_mode(self, agent_id: AgentId, delivery: str | None) -> str | None:
        """The delivery mode without waiting, or None if that needs the type registry first."""
        if delivery is not None:
            if delivery not in DELIVERY_MODES:
                raise ConfigurationError(f"delivery must be one of {DELIVERY_MODES}")
            return delivery
        spec = self._local_spec(agent_id.type)
        if spec is not None:
            return spec.options.delivery
        types = self._types.loaded()
        return None if types is None else self._mode_from(types.get(agent_id.type))

    async def mode(self, agent_id: AgentId, delivery: str | None, timeout: float = 5.0) -> str:
        """The delivery mode: as given, as hosted here, as registered, else at most once.

        `NotConnected` when the registry has not loaded within `timeout`."""
        known = self.known_mode(agent_id, delivery)
        if known is not None:
            return known
        types = await self._types.get_all(timeout)
        return self._mode_from(types.get(agent_id.type))

    def _mode_from(self, raw: bytes | None) -> str:
        if raw is None:
            return "at_most_once"
        cached = self._mode_cache.get(raw)
        if cached is None:
            try:
                cached = str(msgspec.json.decode(raw).get("delivery", "at_most_once"))
            except (msgspec.DecodeError, AttributeError):
                cached = "at_most_once"
            self._mode_cache[raw] = cached
        return cached

    async def split_brain(self, agent_id: AgentId, timeout: float = 5.0) -> bool:
        """Is `agent_id`'s type `split_brain_allowed` (hosted here, or as registered)?"""
        spec = self._local_spec(agent_id.type)
        if spec is not None:
            return spec.options.failover == "split_brain_allowed"
        raw = (await self._types.get_all(timeout)).get(agent_id.type)
        try:
            return raw is not None and msgspec.json.decode(raw).get("failover") == (
                "split_brain_allowed"
            )
        except (msgspec.DecodeError, AttributeError):
            return False

    def known_pool(self, agent_type: str) -> bool | None:
        """Is `agent_type` a worker pool (`stateless`): as hosted here, as registered, else as
        the class defined in this process says (its nodes may not have registered it yet).
        None if that needs the registry first."""
        spec = self._local_spec(agent_type)
        if spec is not None:
            return spec.stateless
        types = self._types.loaded()
        if types is None:
            return None
        raw = types.get(agent_type)
        if raw is None:
            spec = known_spec(agent_type)
            return spec is not None and spec.stateless
        return self._pool_from(raw)

    async def pool(self, agent_type: str, timeout: float = 5.0) -> bool:
        """`known_pool`, waiting for the registry if needed (`NotConnected` when it has not
        loaded within `timeout`)."""
        known = self.known_pool(agent_type)
        if known is None:
            await self._types.get_all(timeout)
            known = self.known_pool(agent_type)
        return bool(known)

    def _pool_from(self, raw: bytes) -> bool:
        cached = self._pool_cache.get(raw)
        if cached is None:
            try:
                cached = msgspec.json.decode(raw).get("stateless") is True
            except (msgspec.DecodeError, AttributeError):
                cached = False
            self._pool_cache[raw] = cached
        return cached

    async def register(self, specs: Iterable[AgentSpec]) -> None:
        """Publish agent types' delivery modes so clients without the classes use them."""
        if self._types.kv is None:
            return
        for spec in specs:
            record: dict[str, object] = {
                "delivery": spec.options.delivery,
                "failover": spec.options.failover,
            }
            if spec.stateless:
                record["stateless"] = True
                record["max_concurrency"] = spec.options.max_concurrency
            value = msgspec.json.encode(record)
            await self._types.kv.put(f"type.{spec.type_name}", value)
            self._types.set_local(spec.type_name, value)

    async def subscribers(self, topic_type: str) -> list[str]:
        """The agent types subscribed to `topic_type`."""
        validate_agent_type(topic_type)
        subs = await self._subs.get_all()
        prefix = f"{topic_type}."
        return sorted(k.removeprefix(prefix) for k in subs if k.startswith(prefix))

    async def subscribe(self, topic_type: str, agent_type: str) -> None:
        validate_agent_type(topic_type)
        validate_agent_type(agent_type)
        if self._subs.kv is None:
            raise ConfigurationError("this mesh has no subscription registry")
        await self._subs.kv.put(f"{topic_type}.{agent_type}", b"1")
        self._subs.set_local(f"{topic_type}.{agent_type}", b"1")
