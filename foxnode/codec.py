"""The message codec: the one place where frames become requests and
replies become frames.

Both the server protocol and the client protocol use it, so the two sides
of a connection can never disagree on the wire format. The replies of the
lab's original node (the "seed" replies of PROTOCOL.md) are spelled here
and nowhere else.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import orjson

from foxnode.config import MAX_DEPTH

# Statuses and texts of the lab's node; clients compare them verbatim.
CANNOT_PARSE = "Cannot parse request message."
NOT_SUPPORTED = "Message body is not supported."



class CodecError(Exception):
    """A frame that is not a request; ``reply`` is what to send back.

    ``has_id``/``rid``: the request's id when the codec already knows it
    (None: unknown, look it up). ``event``: the name, when the frame was an
    event (pushes get no reply)."""

    def __init__(self, reply: "Reply", has_id: bool | None = None, rid: Any = None,
                 event: str | None = None) -> None:
        super().__init__(reply.error)
        self.reply = reply
        self.has_id = has_id
        self.rid = rid
        self.event = event


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


def not_found(why: str) -> Reply:
    return Reply(404, why)


def conflict(why: str) -> Reply:
    return Reply(409, why)


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
    """Parse JSON text; raises ``CodecError(PARSE_ERROR)``.

    The result may hold values JSON cannot carry back (see ``unsendable``)
    only if orjson refused the text."""
    return _loads(payload)[0]


def _loads(payload: bytes | str) -> tuple[Any, bool]:
    """The value, and whether it came from the fallback parser."""
    try:
        return orjson.loads(payload), False
    except (orjson.JSONDecodeError, TypeError, ValueError):
        pass
    # orjson refuses a few texts the lab's node (Python's json) took, such as
    # 1e400 or NaN; only failures pay for the second look.
    try:
        # UTF-8 only (json.loads would guess UTF-16 or -32 from bytes).
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return json.loads(text), True
    except (ValueError, TypeError, RecursionError):
        raise CodecError(PARSE_ERROR) from None


_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def _unsendable_scalar(value: Any) -> str | None:
    if isinstance(value, float):
        if value != value or value in (math.inf, -math.inf):
            return "NaN or Infinity (not a JSON number)"
    elif isinstance(value, int) and not isinstance(value, bool):
        if not _INT64_MIN <= value <= _UINT64_MAX:
            return "an integer beyond 64 bits"
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a lone UTF-16 surrogate (not Unicode text)"
    return None


def unsendable(value: Any) -> str | None:
    """What in ``value`` the node could not send on as JSON, or None.

    Python's json (the fallback of ``loads``) takes NaN, Infinity, 1e999,
    lone surrogate escapes such as "\\ud800" and integers of any size;
    orjson writes NaN as null and refuses the rest, so such a value would
    change on its way or wedge the writer. Walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                fault = _unsendable_scalar(key)
                if fault is not None:
                    return fault + " as a key"
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        else:
            fault = _unsendable_scalar(item)
            if fault is not None:
                return fault
    return None


def decode(payload: bytes, max_depth: int = MAX_DEPTH) -> Request | Response | Event:
    """Turn one WebSocket message into a Request, a Response or an Event.

    ``payload`` is the raw message; a binary message is treated as UTF-8
    text. Anything that is not one of the three raises ``CodecError`` whose
    reply is the seed's answer for it.
    """
    message, fallback = _loads(payload)
    if not isinstance(message, dict):
        raise CodecError(BODY_ERROR)
    # Counting brackets is C-speed and bounds the depth from above, so the
    # walk runs only for the rare message that could be too deep.
    if payload.count(b"[") + payload.count(b"{") > max_depth and _too_deep(message, max_depth):
        raise CodecError(Reply(400, f"Message nests deeper than {max_depth} levels."))
    if fallback:
        _refuse_unsendable(message)
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


def _refuse_unsendable(message: dict) -> None:
    fault = unsendable(message)
    if fault is None:
        return
    rid = message.get("id")
    # An id that is itself unsendable cannot be echoed: the reply goes without.
    has_id = "id" in message and _valid_id(rid) and _unsendable_scalar(rid) is None
    event = message.get("event") if "op" not in message else None
    raise CodecError(Reply(400, f"Message holds {fault}, which JSON cannot carry back."),
                     has_id, rid if has_id else None, event if isinstance(event, str) else None)


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


#: What a reply becomes when it cannot be encoded (a bug, never the
#: client's fault); the node logs nothing more for it than this text.
UNENCODABLE = Reply(500, "Internal error: the reply could not be encoded as JSON.")


def encode_reply(reply: Reply, has_id: bool = False, rid: Any = None) -> bytes:
    """The reply's frame. Never raises for what a reply holds: a reply
    that cannot be encoded becomes ``UNENCODABLE``, an id that cannot
    be echoed is left out."""
    try:
        return _encode_reply(reply, has_id, rid)
    except (orjson.JSONEncodeError, TypeError):
        pass
    if has_id:
        try:
            orjson.dumps(rid)
        except (orjson.JSONEncodeError, TypeError):
            has_id, rid = False, None
    try:
        return _encode_reply(reply, has_id, rid)
    except (orjson.JSONEncodeError, TypeError):
        return _encode_reply(UNENCODABLE, has_id, rid)


def _encode_reply(reply: Reply, has_id: bool, rid: Any) -> bytes:
    if reply.status == 200 and reply.error == "OK":
        # The common reply: its fixed head is spliced, not serialized.
        head = _OK_PREFIX + orjson.dumps(reply.response)
        return head + (b',"id":' + orjson.dumps(rid) + b"}" if has_id else b"}")
    body: dict[str, Any] = {"status": reply.status, "error": reply.error, "response": reply.response}
    if has_id:
        body["id"] = rid
    return exact(orjson.dumps(body))


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
    return exact(orjson.dumps(body))


def exact(frame: bytes) -> bytes:
    """``frame`` in an allocation of its own size. orjson hands back its
    output in the buffer it grew while writing, and keeps it: a 400-byte
    frame holds 4 KiB (orjson 3.13). Frames wait in send queues and in
    gossip's cache, which count ``len(frame)``: copied, what they count is
    what they hold. (The 200 reply is spliced from parts, so a copy already.)"""
    return memoryview(frame).tobytes()


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)
