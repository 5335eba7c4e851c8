"""Envelopes on the wire: versioned msgspec structs, msgpack by default, JSON for other languages.

The encoding of a request is recognised from its first byte (`{` is JSON, anything else is
msgpack, where 0x7b can never start a map); the reply is written in the request's encoding.
See docs/protocol.md for the field-by-field contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from ._errors import BadRequest

PROTOCOL_VERSION: Final = 1

Encoding = Literal["msgpack", "json"]

#: Bounds on an envelope's header fields, checked on decode: a request naming a 1 MB target or
#: type is refused (BadRequest) before any lookup, log line or dead letter repeats it.
MAX_TARGET = 1024
MAX_NAME = 256
Target = Annotated[str, msgspec.Meta(max_length=MAX_TARGET)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
#: Envelope headers (trace context): at most 16, names up to 256, values up to 1024 characters.
Headers = Annotated[dict[Name, Target], msgspec.Meta(max_length=16)]


class Request(msgspec.Struct, omit_defaults=True):
    """A message to one agent. `body` is the message, encoded like the envelope."""

    v: int
    kind: Literal["ask", "tell", "result"]
    target: Target
    type: Name
    body: msgspec.Raw = msgspec.Raw(b"")
    timeout_ms: int | None = None
    id: Name | None = None
    sender: Target | None = None
    reply_to: Target | None = None
    delivery: Name | None = None
    headers: Headers | None = None
    """Trace context (W3C `traceparent`, `tracestate`) when the sender traces."""


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    type: str | None = None


class Reply(msgspec.Struct, omit_defaults=True):
    """An ask's outcome: `ok` with a `body`, or an `error`. `epoch` is the owner's lease epoch."""

    v: int
    ok: bool
    body: msgspec.Raw = msgspec.Raw(b"")
    error: ErrorInfo | None = None
    epoch: int | None = None
    node: str | None = None


_mp_enc = msgspec.msgpack.Encoder()
_js_enc = msgspec.json.Encoder()
_mp_req = msgspec.msgpack.Decoder(Request)
_js_req = msgspec.json.Decoder(Request)
_mp_rep = msgspec.msgpack.Decoder(Reply)
_js_rep = msgspec.json.Decoder(Reply)
_decoders: dict[tuple[Any, Encoding], msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]] = {}


def sniff(data: bytes) -> Encoding:
    return "json" if data[:1] == b"{" else "msgpack"


def encode(obj: Any, encoding: Encoding = "msgpack") -> bytes:
    return _js_enc.encode(obj) if encoding == "json" else _mp_enc.encode(obj)


def decode_as(data: bytes | msgspec.Raw, typ: Any, encoding: Encoding = "msgpack") -> Any:
    """Decode and validate `data` as `typ`; raise BadRequest naming what is wrong."""
    dec = _decoders.get((typ, encoding))
    if dec is None:
        dec = msgspec.json.Decoder(typ) if encoding == "json" else msgspec.msgpack.Decoder(typ)
        _decoders[(typ, encoding)] = dec
    try:
        return dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BadRequest(f"cannot decode {getattr(typ, '__name__', typ)}: {exc}") from None


def decode_request(data: bytes) -> tuple[Request, Encoding]:
    enc = sniff(data)
    try:
        req = (_js_req if enc == "json" else _mp_req).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BadRequest(f"malformed request envelope ({enc}): {exc}") from None
    if req.v != PROTOCOL_VERSION:
        raise BadRequest(
            f"unsupported protocol version {req.v}; this node speaks {PROTOCOL_VERSION}"
        )
    return req, enc


def decode_reply(data: bytes) -> tuple[Reply, Encoding]:
    enc = sniff(data)
    try:
        return (_js_rep if enc == "json" else _mp_rep).decode(data), enc
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BadRequest(f"malformed reply envelope: {exc}") from None


def ok_reply(body: bytes, enc: Encoding, epoch: int | None, node: str | None) -> bytes:
    return encode(
        Reply(v=PROTOCOL_VERSION, ok=True, body=msgspec.Raw(body), epoch=epoch, node=node), enc
    )


def error_reply(code: str, message: str, enc: Encoding, exc_type: str | None = None) -> bytes:
    err = ErrorInfo(code=code, message=message, type=exc_type)
    return encode(Reply(v=PROTOCOL_VERSION, ok=False, error=err), enc)


_type_names: dict[type, str] = {}


def message_type_name(msg_type: type) -> str:
    """The wire name of a message type: its msgspec tag if it declares one, else its class name."""
    name = _type_names.get(msg_type)
    if name is None:
        tag = getattr(getattr(msg_type, "__struct_config__", None), "tag", None)
        name = _type_names[msg_type] = tag if isinstance(tag, str) else msg_type.__name__
    return name
