"""Service specs: what a node agent runs, read from a TOML file and validated field by field.

Every error names the field (`health.interval: must be > 0, got -1`), so `accord deploy` can say
exactly what to fix. Unknown fields are refused: a misspelt `replcias` must not silently deploy
one replica.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from .._errors import ConfigurationError

Policy = Literal["failover", "horizontal", "cost", "geo"]
Balancing = Literal["round_robin", "least_connections"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,40}$")


class InvalidSpec(ConfigurationError):
    """A service spec that does not validate; the message names the field."""


class Health(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = "/health"
    """HTTP path probed on the replica's port; any 2xx answer is healthy."""
    interval: float = 1.0
    """Seconds between probes."""
    timeout: float = 1.0
    """Seconds a probe may take."""
    failure_threshold: int = 3
    """Consecutive failed probes that make a running replica unhealthy (it is then restarted)."""
    grace: float = 15.0
    """Seconds a fresh process has to pass its first probe before it counts as failed."""


class Resources(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cpu: float = 0.0
    """Cores one replica needs, checked against the node label `cpu`."""
    memory: int = 0
    """MiB one replica needs, checked against the node label `memory`."""


class PlacementPolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    policy: Policy = "horizontal"
    zone: str | None = None
    """`geo`: pin every replica to this zone label. Unset: spread over zones."""


class Restart(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backoff_initial: float = 0.5
    """Seconds before the first restart of a crashed process; doubled per consecutive crash."""
    backoff_max: float = 30.0
    """Cap of the restart delay."""
    stable_after: float = 10.0
    """A process that ran this long resets the backoff."""


class PromiseTargets(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replace_within: float = 10.0
    """Action promise: a lost or crashed replica is healthy again within this many seconds."""
    p95_latency_ms: float | None = None
    """State promise on health-probe latency (p95 over the last probes); unset: not promised."""


class ServiceSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    command: list[str]
    workdir: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    port: int = 0
    """0: accord assigns a free port per replica and passes it in `$PORT`."""
    replicas: int = 1
    single_instance: bool = False
    """Never two instances at once, anywhere: the instance runs only under a fenced lease."""
    host: str | None = None
    """Load balancer: route requests whose `Host` header is this name."""
    path_prefix: str | None = None
    """Load balancer: route requests whose path starts with this prefix."""
    balancing: Balancing = "round_robin"
    health: Health = msgspec.field(default_factory=Health)
    resources: Resources = msgspec.field(default_factory=Resources)
    placement: PlacementPolicy = msgspec.field(default_factory=PlacementPolicy)
    restart: Restart = msgspec.field(default_factory=Restart)
    promises: PromiseTargets = msgspec.field(default_factory=PromiseTargets)
    lease_ttl: int = 3
    """Seconds of the single-instance lease (the failover bound is this plus detection)."""

    @property
    def fenced(self) -> bool:
        """Runs only under the service's lease: single-instance and every failover service."""
        return self.single_instance or self.placement.policy == "failover"

    @property
    def wanted_healthy(self) -> int:
        """Healthy replicas the service promises (a fenced one runs one instance at a time)."""
        return 1 if self.fenced else self.replicas

    @property
    def slots(self) -> int:
        """Placement slots: failover services have a primary and a standby."""
        return 2 if self.placement.policy == "failover" else self.replicas


def parse_spec(data: dict[str, Any], source: str = "spec") -> ServiceSpec:
    """Validate a spec given as a mapping (a parsed TOML file, or JSON from the API)."""
    if isinstance(data.get("command"), str):
        data = {**data, "command": shlex.split(data["command"])}
    try:
        spec = msgspec.convert(data, ServiceSpec)
    except msgspec.ValidationError as exc:
        raise InvalidSpec(f"{source}: {_field_message(str(exc))}") from None
    problems = _check(spec)
    if problems:
        raise InvalidSpec(f"{source}: " + "; ".join(problems))
    return spec


def load_spec(path: str | Path) -> ServiceSpec:
    """Read and validate a TOML spec file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise InvalidSpec(f"cannot read {p}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"{p}: not valid TOML: {exc}") from None
    return parse_spec(data, str(p))


def encode_spec(spec: ServiceSpec) -> bytes:
    return msgspec.json.encode(spec)


def decode_spec(data: bytes) -> ServiceSpec:
    return msgspec.json.decode(data, type=ServiceSpec)


def _field_message(text: str) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.health.interval`"; lead with the field."""
    msg, sep, where = text.rpartition(" - at `")
    if not sep:
        msg, where = text, ""
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    m = re.match(r"Object (missing required|contains unknown) field `([^`]+)`", msg)
    if m:
        field = f"{path}.{m.group(2)}" if path else m.group(2)
        return f"{field}: " + ("required, missing" if m.group(1) == "missing required" else
                               "unknown field (misspelt?)")  # fmt: skip
    return f"{path or '(top level)'}: {msg}"


def _check(spec: ServiceSpec) -> list[str]:
    out: list[str] = []
    if not _NAME_RE.match(spec.name):
        out.append(f"name: 1-41 of [a-z0-9-], starting with a letter or digit, got {spec.name!r}")
    if not spec.command or not all(spec.command):
        out.append("command: must name a program, e.g. ['python', 'app.py']")
    if not 0 <= spec.port <= 65535:
        out.append(f"port: must be 0 (assigned) or 1-65535, got {spec.port}")
    if not 1 <= spec.replicas <= 100:
        out.append(f"replicas: must be 1-100, got {spec.replicas}")
    if spec.single_instance and spec.replicas != 1:
        out.append(f"replicas: a single_instance service has exactly 1, got {spec.replicas}")
    if spec.placement.policy == "failover" and spec.replicas != 1:
        out.append("replicas: a failover service runs 1 primary (plus a standby)")
    if spec.port and spec.replicas > 1 and spec.placement.policy == "cost":
        out.append("port: a fixed port cannot be packed: use port = 0 with the cost policy")
    h = spec.health
    for name, value in (("interval", h.interval), ("timeout", h.timeout), ("grace", h.grace)):
        if not 0 < value <= 3600:
            out.append(f"health.{name}: must be > 0 and <= 3600, got {value}")
    if not h.path.startswith("/"):
        out.append(f"health.path: must start with '/', got {h.path!r}")
    if not 1 <= h.failure_threshold <= 100:
        out.append(f"health.failure_threshold: must be 1-100, got {h.failure_threshold}")
    r = spec.restart
    if not 0 < r.backoff_initial <= r.backoff_max <= 3600:
        out.append("restart: need 0 < backoff_initial <= backoff_max <= 3600")
    if spec.resources.cpu < 0 or spec.resources.memory < 0:
        out.append("resources: cpu and memory cannot be negative")
    if spec.path_prefix is not None and not spec.path_prefix.startswith("/"):
        out.append(f"path_prefix: must start with '/', got {spec.path_prefix!r}")
    if spec.promises.replace_within <= 0:
        out.append("promises.replace_within: must be > 0")
    if not 1 <= spec.lease_ttl <= 60:
        out.append(f"lease_ttl: must be 1-60 seconds, got {spec.lease_ttl}")
    for key in spec.env:
        if not key or "=" in key:
            out.append(f"env: bad variable name {key!r}")
    return out
