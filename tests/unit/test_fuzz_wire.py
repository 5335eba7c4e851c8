"""Fuzzing what a node decodes off the wire: request and reply envelopes (random bytes, and
valid envelopes with bytes flipped, cut or appended), message bodies, stored state records, and
the bounds on envelope header fields. Only the documented errors may come out."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord import BadRequest, StateError
from accord import _codec as codec
from accord._ids import AgentId
from accord.state._store import StateRecord, StateStore

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENCODINGS: tuple[codec.Encoding, ...] = ("msgpack", "json")


class Increment(msgspec.Struct):
    by: int = 1


def _valid(enc: codec.Encoding) -> list[bytes]:
    body = msgspec.Raw(codec.encode(Increment(3), enc))
    return [
        codec.encode(codec.Request(v=1, kind="ask", target="counter/a", type="Increment",
                                   body=body, timeout_ms=500, id="x1", sender="s"), enc),
        codec.encode(codec.Request(v=1, kind="tell", target="counter/b", type="Increment",
                                   body=body, delivery="exactly_once"), enc),
        codec.ok_reply(codec.encode(Increment(1), enc), enc, 7, "node-1"),
        codec.error_reply("bad_request", "nope", enc, "BadRequest"),
    ]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid envelope with a few bytes flipped, inserted or removed, or cut short."""
    data = bytearray(draw(st.sampled_from(_valid("msgpack") + _valid("json"))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[i]
        elif op == "cut":
            data = data[:i]
    return bytes(data)


wire = st.binary(max_size=256) | mutated()


@PROPS
@given(wire)
def test_request_decoding_raises_only_bad_request(data: bytes) -> None:
    try:
        req, enc = codec.decode_request(data)
    except BadRequest:
        return
    assert req.v == codec.PROTOCOL_VERSION and enc in ENCODINGS
    assert len(req.target) <= codec.MAX_TARGET and len(req.type) <= codec.MAX_NAME
    # what a node does next with an accepted envelope: decode the body as the handler's type
    with contextlib.suppress(BadRequest):
        codec.decode_as(req.body, Increment, enc)


@PROPS
@given(wire)
def test_reply_decoding_raises_only_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        codec.decode_reply(data)


@PROPS
@given(wire)
def test_a_stored_state_record_that_does_not_decode_is_a_state_error(data: bytes) -> None:
    try:
        record = StateStore.decode(AgentId("counter", "a"), data)
    except StateError:
        return
    assert isinstance(record, StateRecord)


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("field", ["target", "type", "id", "sender", "reply_to", "delivery"])
def test_oversized_envelope_header_fields_are_refused(enc: codec.Encoding, field: str) -> None:
    fields = {"v": 1, "kind": "ask", "target": "counter/a", "type": "Increment"}
    fields[field] = "x" * (codec.MAX_TARGET + 1)
    with pytest.raises(BadRequest, match="length"):
        codec.decode_request(codec.encode(fields, enc))
    fields[field] = "x" * (codec.MAX_NAME if field in ("type", "id", "delivery") else 1024)
    assert codec.decode_request(codec.encode(fields, enc))[0]
