"""What `accord deploy / services / undeploy / logs / promises` do, usable from any Mesh."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from ._placement import conflicts
from ._promises import (
    PromiseRecord,
    Reputation,
    claim,
    records,
    register,
    release,
    store_for,
    withdraw,
)
from ._spec import InvalidSpec, ServiceSpec
from ._store import Assessment, LogLine, PromiseConflict

if TYPE_CHECKING:
    from .._mesh import Mesh


def claims_of(spec: ServiceSpec) -> list[str]:
    out = []
    if spec.port:
        out.append(f"port:{spec.port}")
    if spec.host or spec.path_prefix:
        out.append(f"route:{spec.host or '*'}{spec.path_prefix or '/'}")
    return out


def promises_of(spec: ServiceSpec) -> list[PromiseRecord]:
    promiser = f"service/{spec.name}"
    want = spec.wanted_healthy
    out = [
        PromiseRecord(name=f"{spec.name}.replicas", promiser=promiser, kind="state",
                      description=f"service {spec.name} has {want} healthy replica(s)"),
        PromiseRecord(name=f"{spec.name}.replace", promiser=promiser, kind="action",
                      description=f"a lost replica of {spec.name} is healthy again within "
                                  f"{spec.promises.replace_within:g}s"),
    ]  # fmt: skip
    if spec.promises.p95_latency_ms is not None:
        out.append(PromiseRecord(
            name=f"{spec.name}.latency", promiser=promiser, kind="state",
            description=f"p95 health latency of {spec.name} < {spec.promises.p95_latency_ms:g} ms",
        ))  # fmt: skip
    return out


async def deploy(mesh: Mesh, spec: ServiceSpec) -> int:
    """Deploy (or update) a service. Raises `PromiseConflict` without deploying anything when the
    spec contradicts another service or cannot be kept by the live nodes. Returns the revision."""
    store = await store_for(mesh)
    nodes = await store.nodes()
    if not nodes:
        raise PromiseConflict(f"service {spec.name!r} rejected: no live node in the cluster")
    existing = await store.specs()
    others = [s for n, (s, _) in existing.items() if n != spec.name]
    problems = conflicts(spec, nodes, others)
    if problems:
        raise PromiseConflict(f"service {spec.name!r} rejected: " + "; ".join(problems))
    owner = f"service/{spec.name}"
    await claim(store, owner, claims_of(spec))
    try:
        deployed = existing.get(spec.name)
        rev = await store.deploy(spec, deployed[1] if deployed is not None else None)
    except BaseException:
        await release(store, owner, claims_of(spec))
        raise
    for r in promises_of(spec):
        await register(store, r)
    return rev


async def undeploy(mesh: Mesh, name: str) -> None:
    store = await store_for(mesh)
    specs = await store.specs()
    if name not in specs:
        raise InvalidSpec(f"no service named {name!r} is deployed")
    spec = specs[name][0]
    await store.undeploy(name)
    await release(store, f"service/{name}", claims_of(spec))
    for r in promises_of(spec):
        await withdraw(store, r.name)


async def services(mesh: Mesh) -> list[dict[str, Any]]:
    """Every service with its placement and the instances the nodes report."""
    store = await store_for(mesh)
    specs = await store.specs()
    placements = await store.placements()
    instances = await store.instances()
    live = {n.name for n in await store.nodes(fresh_within=2.0)}
    out = []
    for name in sorted(specs):
        spec = specs[name][0]
        p = placements.get(name)
        insts = [i for i in instances if i.service == name]
        out.append({
            "name": name,
            "policy": spec.placement.policy,
            "replicas": spec.replicas,
            "single_instance": spec.single_instance,
            "healthy": sum(1 for i in insts if i.status == "healthy" and i.node in live),
            "placement": [msgspec.to_builtins(s) for s in p[0].slots] if p else [],
            "decided_by": p[0].decided_by if p else None,
            "decided_at": p[0].at if p else None,
            "instances": [
                {**msgspec.to_builtins(i), "node_alive": i.node in live} for i in insts
            ],
        })  # fmt: skip
    return out


async def explain(mesh: Mesh, name: str) -> dict[str, Any]:
    """Why each replica of `name` is where it is."""
    for svc in await services(mesh):
        if svc["name"] == name:
            return svc
    raise InvalidSpec(f"no service named {name!r} is deployed")


async def logs(mesh: Mesh, name: str, last: int = 200) -> list[LogLine]:
    store = await store_for(mesh)
    if name not in await store.specs():
        raise InvalidSpec(f"no service named {name!r} is deployed")
    return await store.logs(name, last)


async def promises_report(mesh: Mesh, last: int = 2000) -> dict[str, Any]:
    """Every promise with its latest assessment, the recent ledger, and reputations."""
    store = await store_for(mesh)
    ledger = await store.ledger(last)
    rep = Reputation()
    latest: dict[str, Assessment] = {}
    for a in ledger:
        rep.add(a)
        latest[a.promise] = a
    promises = []
    for r in await records(store):
        seen = latest.get(r.name)
        promises.append({
            **msgspec.to_builtins(r),
            "outcome": seen.outcome if seen else "unknown",
            "evidence": seen.evidence if seen else "not assessed yet",
            "assessed_at": seen.at if seen else None,
        })  # fmt: skip
    return {
        "promises": promises,
        "reputation": rep.table(),
        "ledger": [msgspec.to_builtins(a) for a in ledger[-50:]],
        "at": time.time(),
    }
