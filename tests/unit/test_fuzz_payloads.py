"""Fuzzing the other decoders and parsers: CRDT payloads (decoded, then merged), service specs
(TOML mappings and stored JSON), CLI JSON arguments, and bus events (membership heartbeats, the
cluster record, service assessments and log lines). Only the documented errors may come out."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord import BadRequest, ConfigurationError, crdt
from accord import _codec as codec
from accord._cli._common import _json_arg
from accord.cluster._membership import MemberInfo
from accord.cluster._replication import decode_config
from accord.services._spec import decode_spec, parse_spec
from accord.services._store import Assessment, Instance, LogLine, Placement

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MSGSPEC_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=15,
)  # fmt: skip
CRDTS: list[Any] = [crdt.GCounter, crdt.PNCounter, crdt.GSet[str], crdt.ORSet[str],
                    crdt.LWWRegister[int], crdt.ORMap[crdt.GCounter]]  # fmt: skip


def _blobs() -> st.SearchStrategy[bytes]:
    as_json = json_values.map(lambda v: msgspec.json.encode(v))
    as_msgpack = json_values.filter(lambda v: not _huge(v)).map(lambda v: msgspec.msgpack.encode(v))
    return st.binary(max_size=200) | as_json | as_msgpack


def _huge(v: Any) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return not -(2**63) <= v < 2**64
    if isinstance(v, list):
        return any(_huge(x) for x in v)
    if isinstance(v, dict):
        return any(_huge(x) for x in v.values())
    return False


@PROPS
@given(st.sampled_from(CRDTS), _blobs(), st.sampled_from(["msgpack", "json"]))
def test_crdt_payloads_decode_or_raise_bad_request_and_decoded_ones_merge(
    typ: Any, data: bytes, enc: codec.Encoding
) -> None:
    try:
        value = codec.decode_as(data, typ, enc)
    except BadRequest:
        return
    merged = crdt.merge(value, value)  # idempotence holds for anything that decoded
    assert merged == value or merged.merge(value) == merged


@PROPS
@given(st.dictionaries(st.sampled_from(["name", "command", "replicas", "placement", "env",
                                        "health", "port", "restart", "cwd", "x"]),
                       json_values, max_size=6))  # fmt: skip
def test_service_spec_mappings_parse_or_raise_configuration_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigurationError):
        parse_spec(data)


@PROPS
@given(_blobs())
def test_stored_service_specs_decode_or_raise_msgspec_errors(data: bytes) -> None:
    with contextlib.suppress(MSGSPEC_ERRORS):
        decode_spec(data)


@PROPS
@given(st.text(max_size=200) | json_values.map(lambda v: msgspec.json.encode(v).decode()))
def test_cli_json_arguments_parse_to_an_object_or_raise_configuration_error(text: str) -> None:
    try:
        out = _json_arg(text)
    except ConfigurationError:
        return
    assert isinstance(msgspec.json.decode(out), dict)


@pytest.mark.parametrize("typ", [MemberInfo, Assessment, LogLine, Placement, Instance])
@PROPS
@given(data=_blobs())
def test_bus_events_decode_or_raise_msgspec_errors(typ: Any, data: bytes) -> None:
    with contextlib.suppress(MSGSPEC_ERRORS):
        msgspec.json.decode(data, type=typ)


@PROPS
@given(_blobs())
def test_the_cluster_record_decodes_or_raises_msgspec_errors(data: bytes) -> None:
    with contextlib.suppress(MSGSPEC_ERRORS):
        decode_config(data)
