"""Wire envelopes: round trips in both encodings, encoding sniffing, and hostile input."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord import BadRequest
from accord import _codec as codec
from accord._codec import ErrorInfo, Reply, Request

ENCODINGS: tuple[codec.Encoding, ...] = ("msgpack", "json")
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

int64 = st.integers(-(2**63), 2**63 - 1)
opt_text = st.none() | st.text(max_size=40)
# JSON-and-msgpack-representable message bodies
bodies = st.recursive(
    st.none() | st.booleans() | int64 | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def requests(draw: st.DrawFn, encoding: codec.Encoding) -> Request:
    body = draw(st.none() | bodies)
    # An absent body is left to the field default: an explicit `Raw(b"")` is not omitted by
    # msgspec (it compares defaults by identity) and would produce a corrupt frame.
    extra = {} if body is None else {"body": msgspec.Raw(codec.encode(body, encoding))}
    return Request(
        v=draw(int64),
        kind=draw(st.sampled_from(["ask", "tell"])),
        target=draw(st.text(max_size=60)),
        type=draw(st.text(max_size=30)),
        timeout_ms=draw(st.none() | st.integers(0, 2**53)),
        id=draw(opt_text),
        sender=draw(opt_text),
        **extra,
    )


@st.composite
def replies(draw: st.DrawFn, encoding: codec.Encoding) -> Reply:
    ok = draw(st.booleans())
    body = draw(bodies) if ok else None
    error = None
    if not ok:
        error = ErrorInfo(
            code=draw(st.text(max_size=20)), message=draw(st.text()), type=draw(opt_text)
        )
    extra = {"body": msgspec.Raw(codec.encode(body, encoding))} if ok else {}
    return Reply(
        v=draw(int64),
        ok=ok,
        error=error,
        epoch=draw(st.none() | st.integers(0, 2**63 - 1)),
        node=draw(opt_text),
        **extra,
    )


def as_tuple(obj: Request | Reply) -> tuple[Any, ...]:
    """Struct fields with Raw bodies compared as bytes."""
    return tuple(
        bytes(v) if isinstance(v, msgspec.Raw) else v
        for v in (getattr(obj, f) for f in obj.__struct_fields__)
    )


def decode_body(raw: msgspec.Raw, encoding: codec.Encoding) -> Any:
    return codec.decode_as(raw, Any, encoding)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@PROPS
@given(data=st.data())
def test_request_round_trips(encoding: codec.Encoding, data: st.DataObject) -> None:
    req = data.draw(requests(encoding))
    wire = codec.encode(req, encoding)
    assert codec.sniff(wire) == encoding
    dec = codec.decode_as(wire, Request, encoding)
    assert as_tuple(dec) == as_tuple(req)
    if bytes(req.body):
        assert decode_body(dec.body, encoding) == decode_body(req.body, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
@PROPS
@given(data=st.data())
def test_current_version_request_decodes_with_its_encoding(
    encoding: codec.Encoding, data: st.DataObject
) -> None:
    req = data.draw(requests(encoding))
    req.v = codec.PROTOCOL_VERSION
    dec, enc = codec.decode_request(codec.encode(req, encoding))
    assert enc == encoding
    assert as_tuple(dec) == as_tuple(req)


@pytest.mark.parametrize("encoding", ENCODINGS)
@PROPS
@given(data=st.data())
def test_reply_round_trips(encoding: codec.Encoding, data: st.DataObject) -> None:
    rep = data.draw(replies(encoding))
    wire = codec.encode(rep, encoding)
    assert codec.sniff(wire) == encoding
    dec, enc = codec.decode_reply(wire)
    assert enc == encoding
    assert as_tuple(dec) == as_tuple(rep)


@pytest.mark.parametrize("encoding", ENCODINGS)
@PROPS
@given(body=bodies, epoch=st.none() | st.integers(0, 2**40), node=opt_text)
def test_ok_reply_helper_round_trips(
    encoding: codec.Encoding, body: Any, epoch: int | None, node: str | None
) -> None:
    wire = codec.ok_reply(codec.encode(body, encoding), encoding, epoch, node)
    rep, enc = codec.decode_reply(wire)
    assert (enc, rep.v, rep.ok, rep.error, rep.epoch, rep.node) == (
        encoding,
        codec.PROTOCOL_VERSION,
        True,
        None,
        epoch,
        node,
    )
    assert decode_body(rep.body, encoding) == body


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_error_reply_helper_round_trips(encoding: codec.Encoding) -> None:
    wire = codec.error_reply("remote_error", "it broke", encoding, "ValueError")
    rep, enc = codec.decode_reply(wire)
    assert enc == encoding
    assert not rep.ok
    assert rep.error == ErrorInfo(code="remote_error", message="it broke", type="ValueError")


def test_omitted_defaults_are_not_on_the_wire() -> None:
    req = Request(v=1, kind="tell", target="a/b", type="T")
    assert codec.encode(req, "json") == b'{"v":1,"kind":"tell","target":"a/b","type":"T"}'
    dec, _ = codec.decode_request(codec.encode(req))
    assert bytes(dec.body) == b""
    assert (dec.timeout_ms, dec.id, dec.sender) == (None, None, None)


# -- sniffing ---------------------------------------------------------------------------------


def test_sniff_recognises_json_by_its_first_byte() -> None:
    assert codec.sniff(b"{") == "json"
    assert codec.sniff(b'{"v":1}') == "json"
    assert codec.sniff(b"") == "msgpack"
    assert codec.sniff(b" {") == "msgpack"
    assert codec.sniff(b"\x81\xa1v\x01") == "msgpack"


@given(st.dictionaries(st.text(max_size=5), int64, max_size=5))
def test_msgpack_maps_never_start_with_an_open_brace(obj: dict[str, int]) -> None:
    assert codec.sniff(codec.encode(obj, "msgpack")) == "msgpack"
    assert codec.sniff(codec.encode(obj, "json")) == "json"


# -- hostile input -----------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=256))
def test_decode_request_only_ever_raises_bad_request(data: bytes) -> None:
    try:
        req, enc = codec.decode_request(data)
    except BadRequest:
        return
    assert req.v == codec.PROTOCOL_VERSION
    assert enc == codec.sniff(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256).map(lambda b: b"{" + b))
def test_decode_request_only_ever_raises_bad_request_for_json_looking_input(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        codec.decode_request(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_decode_reply_only_ever_raises_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        codec.decode_reply(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"{}",
        b"[]",
        b"\xc1",
        b"\x90",
        b'{"v":1}',
        b'{"v":1,"kind":"shout","target":"a/b","type":"T"}',
        b'{"v":"1","kind":"ask","target":"a/b","type":"T"}',
        b'{"v":1,"kind":"ask","target":5,"type":"T"}',
        b'{"v":1,"kind":"ask","target":"a/b","type":"T","timeout_ms":"soon"}',
        b'{"v":1,"kind":"ask","target":"a/b","type":"T"',
        b'{"v":1,"kind":"ask","target":"a/b","type":"T","body":}',
        b"\xff\xfe{",
    ],
)
def test_decode_request_rejects_malformed_envelopes(data: bytes) -> None:
    with pytest.raises(BadRequest):
        codec.decode_request(data)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("version", [0, 2, -1, 10**6])
def test_decode_request_rejects_other_protocol_versions(
    encoding: codec.Encoding, version: int
) -> None:
    req = Request(v=version, kind="ask", target="a/b", type="T")
    with pytest.raises(BadRequest, match="unsupported protocol version"):
        codec.decode_request(codec.encode(req, encoding))


def test_decode_as_raises_bad_request_naming_the_type() -> None:
    class Point(msgspec.Struct):
        x: int

    assert codec.decode_as(codec.encode(Point(3)), Point) == Point(3)
    assert codec.decode_as(b'{"x":3}', Point, "json") == Point(3)
    with pytest.raises(BadRequest, match="Point"):
        codec.decode_as(codec.encode({"x": "three"}), Point)
    with pytest.raises(BadRequest, match="Point"):
        codec.decode_as(b"not json", Point, "json")


def _deep(encoding: codec.Encoding, depth: int) -> bytes:
    """A current-version request whose (skipped) body nests `depth` arrays deep."""
    if encoding == "json":
        head = b'{"v":1,"kind":"ask","target":"a/b","type":"T","body":'
        return head + b"[" * depth + b"]" * depth + b"}"
    head = b"\x85\xa1v\x01\xa4kind\xa3ask\xa6target\xa3a/b\xa4type\xa1T\xa4body"
    return head + b"\x91" * depth + b"\xc0"


#: Deeper than any supported interpreter lets msgspec go: the depth where decoding stops depends
#: on the interpreter's recursion guard (Python 3.11 stops below 1,000, 3.13 above 5,000).
TOO_DEEP = 100_000


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_deeply_nested_request_is_a_bad_request(encoding: codec.Encoding) -> None:
    with pytest.raises(BadRequest):
        codec.decode_request(_deep(encoding, TOO_DEEP))


def test_deeply_nested_reply_body_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        codec.decode_as(b"[" * TOO_DEEP + b"]" * TOO_DEEP, list, "json")


def test_message_type_name_is_the_tag_or_the_class_name() -> None:
    class Plain(msgspec.Struct):
        pass

    class Tagged(msgspec.Struct, tag="orders.placed"):
        pass

    class TaggedTrue(msgspec.Struct, tag=True):
        pass

    assert codec.message_type_name(Plain) == "Plain"
    assert codec.message_type_name(Tagged) == "orders.placed"
    assert codec.message_type_name(TaggedTrue) == "TaggedTrue"
