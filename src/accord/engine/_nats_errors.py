"""nats-py errors to accord's: `map_errors` wraps every engine call (httpcore's `map_exceptions`),
and `api_error` reads a JetStream API error reply.

Timeouts become `NotConnected` (the seam's default: "unreachable or no answer in time") unless the
method documents `RequestTimeout`, which its caller passes as `timeout_is`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import nats.errors
import nats.js.errors

from .._errors import AccordError, NotConnected, StorageFull
from ._api import NoResponders, NotFound, Refused, RequestTimeout, WrongRevision

WRONG_LAST_SEQUENCE = (10071, 10164)
TEMPORARILY_UNAVAILABLE = 10008
NO_MESSAGE_FOUND = 10037
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
_NOT_FOUND = (NO_MESSAGE_FOUND, STREAM_NOT_FOUND, CONSUMER_NOT_FOUND)
#: No room: account resources (10002), server "insufficient resources" (10023: its file or memory
#: store limit reached), memory/storage reservation refused at creation (10028, 10047), a stream's
#: own `max_bytes` with discard-new (10077 "maximum bytes exceeded"). nats-server answers all of
#: them with status 503, like "JetStream unavailable": the err_code tells them apart.
STORAGE_FULL = (10002, 10023, 10028, 10047, 10077)

_SIGNALS = (AccordError, NoResponders, RequestTimeout, WrongRevision, NotFound, Refused)


def api_error(err_code: int | None, code: int | None, description: str, what: str) -> Exception:
    """The accord error for a JetStream API error (`err_code`, or only the status `code`)."""
    if err_code in STORAGE_FULL:
        return StorageFull(f"{what}: {description or 'no storage left'} (error {err_code})")
    if err_code in WRONG_LAST_SEQUENCE:
        return WrongRevision(f"{what}: {description}")
    if err_code in _NOT_FOUND or (err_code is None and code == 404):
        return NotFound(f"{what}: {description}")
    if err_code == TEMPORARILY_UNAVAILABLE or code == 503:
        return NotConnected(f"{what}: JetStream is unavailable: {description}")
    return Refused(f"{what}: {description} (error {err_code or code})")


def error_from_reply(error: dict[str, Any], what: str) -> Exception:
    """`api_error` for the `error` object of a JSON API reply."""
    return api_error(
        error.get("err_code"), error.get("code"), str(error.get("description", "")), what
    )


@contextlib.contextmanager
def map_errors(what: str, timeout_is: type[Exception] = NotConnected) -> Iterator[None]:
    """Translate any nats-py (or socket, or timeout) error escaping the block; `what` names the
    operation in the message. Accord errors and the seam's signals pass through."""
    try:
        yield
    except _SIGNALS:
        raise
    except nats.js.errors.NotFoundError as exc:  # incl. BucketNotFoundError, KeyNotFoundError
        raise NotFound(f"{what}: {exc.description or 'not found'}") from None
    except nats.js.errors.ServiceUnavailableError as exc:  # JetStream down, or out of space
        if exc.err_code in STORAGE_FULL:
            raise api_error(exc.err_code, exc.code, exc.description or "", what) from None
        raise NotConnected(f"{what}: JetStream is unavailable: {exc.description or ''}") from None
    except nats.js.errors.APIError as exc:
        raise api_error(exc.err_code, exc.code, exc.description or "", what) from None
    except nats.errors.MaxPayloadError:
        raise Refused(f"{what}: message larger than the server accepts") from None
    except nats.errors.NoRespondersError:
        raise NoResponders(what) from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise timeout_is(f"{what}: no answer in time") from None
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise NotConnected(f"{what}: {type(exc).__name__}: {exc}") from None
