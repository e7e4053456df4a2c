"""The message codec: the one place where frames become requests and
replies become frames.

Both the server protocol and the client protocol use it, so the two sides
of a connection can never disagree on the wire format. The replies of the
lab's original node (the "seed" replies of PROTOCOL.md) are spelled here
and nowhere else.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import orjson

# Statuses and texts of the lab's node; clients compare them verbatim.
CANNOT_PARSE = "Cannot parse request message."
NOT_SUPPORTED = "Message body is not supported."

#: Deepest JSON nesting a request may have; deeper ones cost memory and
#: recursion for nothing a node needs.
DEFAULT_MAX_DEPTH = 64


class CodecError(Exception):
    """A frame that is not a request; ``reply`` is what to send back."""

    def __init__(self, reply: "Reply") -> None:
        super().__init__(reply.error)
        self.reply = reply


# Plain named tuples, not attrs classes: one of each is made per message,
# and a tuple is the cheapest immutable object Python builds.

class Request(NamedTuple):
    op: str
    args: Any = None
    id: str | int | float | None = None
    #: True when the frame carried an ``id`` to echo (a string or a number).
    has_id: bool = False


class Reply(NamedTuple):
    status: int
    error: str
    response: Any = None

    def ok(self) -> bool:
        return 200 <= self.status < 300


class Response(NamedTuple):
    """A reply as received by the side that sent the request."""

    reply: Reply
    id: Any = None


class Event(NamedTuple):
    """A frame the other side pushed: ``{"event": name, ...}``."""

    name: str
    body: dict


# -- replies -----------------------------------------------------------------

def ok(response: Any = None) -> Reply:
    return Reply(200, "OK", response)


def accepted(response: Any = None) -> Reply:
    return Reply(202, "Accepted", response)


def not_found_op(op: str) -> Reply:
    return Reply(404, f'Operation "{op}" is not supported.')


def missing_args(op: str, *names: str) -> Reply:
    wanted = ", ".join(f'"{n}"' for n in names)
    return Reply(500, f'Operation "{op}" requires the following "args": {wanted}')


def bad_args(op: str, why: str) -> Reply:
    return Reply(400, f'Operation "{op}" has invalid "args": {why}')


def unavailable(why: str) -> Reply:
    return Reply(503, why)


def too_many(why: str) -> Reply:
    return Reply(429, why)


def forbidden(why: str) -> Reply:
    return Reply(403, why)


PARSE_ERROR = Reply(500, CANNOT_PARSE)
BODY_ERROR = Reply(500, NOT_SUPPORTED)


# -- decoding ----------------------------------------------------------------

def _valid_id(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _too_deep(value: Any, limit: int) -> bool:
    # Iterative, so a hostile document cannot blow the Python stack.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads(payload: bytes | str) -> Any:
    """Parse JSON text; raises ``CodecError(PARSE_ERROR)``."""
    try:
        return orjson.loads(payload)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        pass
    # orjson refuses a few texts the lab's node (Python's json) took, such as
    # 1e400 or NaN; only failures pay for the second look.
    try:
        # UTF-8 only (json.loads would guess UTF-16 or -32 from bytes).
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise CodecError(PARSE_ERROR) from None


def decode(payload: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Request | Response | Event:
    """Turn one WebSocket message into a Request, a Response or an Event.

    ``payload`` is the raw message; a binary message is treated as UTF-8
    text. Anything that is not one of the three raises ``CodecError`` whose
    reply is the seed's answer for it.
    """
    message = loads(payload)
    if not isinstance(message, dict):
        raise CodecError(BODY_ERROR)
    # Counting brackets is C-speed and bounds the depth from above, so the
    # walk runs only for the rare message that could be too deep.
    if payload.count(b"[") + payload.count(b"{") > max_depth and _too_deep(message, max_depth):
        raise CodecError(Reply(400, f"Message nests deeper than {max_depth} levels."))
    op = message.get("op")
    if isinstance(op, str):
        rid = message.get("id")
        has_id = "id" in message and _valid_id(rid)
        return Request(op, message.get("args"), rid if has_id else None, has_id)
    status = message.get("status")
    if isinstance(status, int) and not isinstance(status, bool) and "op" not in message:
        reply = Reply(status, str(message.get("error", "")), message.get("response"))
        return Response(reply, message.get("id"))
    event = message.get("event")
    if isinstance(event, str) and "op" not in message:
        return Event(event, message)
    raise CodecError(BODY_ERROR)


def request_id_of(payload: bytes) -> tuple[bool, Any]:
    """Best-effort id of a request that failed validation, so that even an
    error reply can be matched by a client that sent an id."""
    try:
        message = orjson.loads(payload)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return False, None
    if isinstance(message, dict) and "id" in message and _valid_id(message["id"]):
        return True, message["id"]
    return False, None


# -- encoding ----------------------------------------------------------------

_OK_PREFIX = b'{"status":200,"error":"OK","response":'


def encode_reply(reply: Reply, has_id: bool = False, rid: Any = None) -> bytes:
    if reply.status == 200 and reply.error == "OK":
        # The common reply: its fixed head is spliced, not serialized.
        head = _OK_PREFIX + orjson.dumps(reply.response)
        return head + (b',"id":' + orjson.dumps(rid) + b"}" if has_id else b"}")
    body: dict[str, Any] = {"status": reply.status, "error": reply.error, "response": reply.response}
    if has_id:
        body["id"] = rid
    return orjson.dumps(body)


def encode_request(op: str, args: Any = None, rid: Any = None) -> bytes:
    body: dict[str, Any] = {"op": op}
    if args is not None:
        body["args"] = args
    if rid is not None:
        body["id"] = rid
    return orjson.dumps(body)


def encode_event(name: str, **fields: Any) -> bytes:
    body: dict[str, Any] = {"event": name}
    body.update(fields)
    return orjson.dumps(body)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)
