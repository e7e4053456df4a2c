"""The dial lifecycle of every known address: one record per address, with
a named state, changed only by the transition table below.

This is where an address's dial state lives. The peer manager (peers.py)
feeds it events, each with the time they happened, and acts on what it
answers; nothing here touches a socket, the store or a clock, so every
path through the lifecycle is a table lookup a test can walk with plain
numbers (tests/test_dialing.py). What outlives the process (failures, the
node id behind the address, whether it is the node itself) stays in the
peer store's record; what only matters while the node runs (the state,
when a backoff ends, the dial in flight) lives here.

The states (and where the page shows "failing": an address in backoff
that failed three times or more in a row)::

    idle --dial--> dialing --opened--> handshaking --handshaken--> connected
      ^               |                    |   |--probed--> idle
      |               |                    |   '--is-self--> self
      |               '------ failed, turned-away, cancelled ------.
      |                                                            v
      '--------------------- retry (at retry_at) <------------- backoff
    connected --closed--> backoff;  idle/backoff --inbound--> connected
    idle/backoff --forget--> forgotten (the store drops the address)

The scheduler's choice, which addresses to dial in one round, is a pure
function of the records, the store's view of them and ``now``
(``choose``), as go-ethereum's dial scheduler is.
"""

from __future__ import annotations

import enum
import heapq
import random
from typing import Any, Callable, Iterable, Iterator

import attrs


class State(str, enum.Enum):
    IDLE = "idle"
    DIALING = "dialing"
    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    SELF = "self"
    FORGOTTEN = "forgotten"


class Event(str, enum.Enum):
    #: a dial (or a probe) of the address started
    DIAL = "dial"
    #: the WebSocket opened; the hello is under way
    OPENED = "opened"
    #: the hello succeeded: the address leads to a peer
    HANDSHAKEN = "handshaken"
    #: a probe was answered: the address is proven, and closed again
    PROBED = "probed"
    #: the dial or the hello failed: one more failure
    FAILED = "failed"
    #: the other node turned us away (already connected, full): not the
    #: address's fault, no failure counted
    TURNED_AWAY = "turned-away"
    #: the address is this node itself
    IS_SELF = "is-self"
    #: the node stopped and cancelled the dial
    CANCELLED = "cancelled"
    #: the connected peer went away
    CLOSED = "closed"
    #: the node behind the address dialed us: connected without a dial
    INBOUND = "inbound"
    #: the backoff is over
    RETRY = "retry"
    #: failing for too long: dropped
    FORGET = "forget"


S, E = State, Event

#: (state, event) -> the next state. A pair not listed is not a transition:
#: ``DialBook.on`` ignores it and says so (``False``).
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.DIAL): S.DIALING,
    # Asked for outright (a test, the operator), a dial need not wait out a backoff.
    (S.BACKOFF, E.DIAL): S.DIALING,
    (S.DIALING, E.OPENED): S.HANDSHAKING,
    (S.HANDSHAKING, E.HANDSHAKEN): S.CONNECTED,
    (S.HANDSHAKING, E.PROBED): S.IDLE,
    (S.HANDSHAKING, E.IS_SELF): S.SELF,
    (S.DIALING, E.FAILED): S.BACKOFF,
    (S.HANDSHAKING, E.FAILED): S.BACKOFF,
    (S.DIALING, E.TURNED_AWAY): S.BACKOFF,
    (S.HANDSHAKING, E.TURNED_AWAY): S.BACKOFF,
    (S.DIALING, E.CANCELLED): S.IDLE,
    (S.HANDSHAKING, E.CANCELLED): S.IDLE,
    (S.CONNECTED, E.CLOSED): S.BACKOFF,
    (S.IDLE, E.INBOUND): S.CONNECTED,
    (S.BACKOFF, E.INBOUND): S.CONNECTED,
    (S.BACKOFF, E.RETRY): S.IDLE,
    (S.IDLE, E.FORGET): S.FORGOTTEN,
    (S.BACKOFF, E.FORGET): S.FORGOTTEN,
}

#: States in which the address has a dial in flight.
IN_FLIGHT = frozenset({S.DIALING, S.HANDSHAKING})
#: Failures in a row from which the page calls an address in backoff "failing".
FAILING_AFTER = 3


@attrs.define(eq=False)
class Dial:
    """One address's place in its lifecycle."""

    addr: str
    state: State = S.IDLE
    #: when the state was entered
    since: float = 0.0
    #: in ``backoff``: when it ends
    retry_at: float = 0.0
    #: in ``dialing``/``handshaking``: the dial's Deferred (to cancel it),
    #: and once the WebSocket is open, its connection
    attempt: Any = None
    conn: Any = None


@attrs.frozen
class Seen:
    """What the scheduler needs of an address's store record."""

    addr: str
    node_id: str | None
    #: bootstrap or proven by a handshake: dialed first
    preferred: bool
    failures: int


class DialBook:
    """Every address's ``Dial``: an address absent from the book is idle.
    The book holds only addresses that left ``idle``, so it stays within
    the store's size: ``FORGOTTEN`` and ``IDLE`` records are dropped."""

    def __init__(self, on_transition: Callable[[Dial, State, Event], None] | None = None) -> None:
        self._dials: dict[str, Dial] = {}
        #: told of every transition (old state, the event), for the log and tests
        self._on_transition = on_transition

    def __len__(self) -> int:
        return len(self._dials)

    def __iter__(self) -> Iterator[Dial]:
        return iter(list(self._dials.values()))

    def get(self, addr: str) -> Dial:
        """The address's record (a fresh idle one if it has none)."""
        return self._dials.get(addr) or Dial(addr)

    def state(self, addr: str) -> State:
        dial = self._dials.get(addr)
        return dial.state if dial is not None else S.IDLE

    def mark_self(self, addr: str, now: float) -> None:
        """An address the store knows to be this node (from an earlier run)."""
        self._dials[addr] = Dial(addr, S.SELF, since=now)

    def on(self, addr: str, event: Event, now: float, retry_at: float | None = None) -> bool:
        """Apply ``event`` to ``addr`` at ``now``; ``retry_at`` is when a
        backoff it enters ends. False (and nothing changed) if the table has
        no such transition from the address's state."""
        dial = self._dials.get(addr) or Dial(addr)
        old = dial.state
        new = TRANSITIONS.get((old, event))
        if new is None:
            return False
        dial.state, dial.since = new, now
        if new is S.BACKOFF:
            dial.retry_at = now if retry_at is None else retry_at
        if new not in IN_FLIGHT:
            dial.attempt = dial.conn = None
        if new in (S.IDLE, S.FORGOTTEN):
            self._dials.pop(addr, None)
        else:
            self._dials[addr] = dial
        if self._on_transition is not None:
            self._on_transition(dial, old, event)
        return True

    def forget(self, addr: str) -> None:
        """The operator took the address back (``unregister``): whatever
        it was doing, it has no record any more."""
        self._dials.pop(addr, None)

    def retry_due(self, now: float) -> list[str]:
        """Move every address whose backoff is over back to ``idle``."""
        due = [d.addr for d in self._dials.values() if d.state is S.BACKOFF and d.retry_at <= now]
        for addr in due:
            self.on(addr, E.RETRY, now)
        return due

    def in_flight(self) -> list[Dial]:
        return [d for d in self._dials.values() if d.state in IN_FLIGHT]

    def keep_only(self, addrs: Callable[[str], bool]) -> None:
        """Drop the records of addresses the store no longer holds."""
        for addr in [a for a, d in self._dials.items() if d.state not in IN_FLIGHT and not addrs(a)]:
            del self._dials[addr]

    def label(self, addr: str, failures: int) -> str:
        """The state as the node's page shows it."""
        state = self.state(addr)
        if state is S.BACKOFF and failures >= FAILING_AFTER:
            return "failing"
        return state.value


def choose(book: DialBook, seen: Iterable[Seen], connected_ids: set[str], limit: int,
           rank_noise: Callable[[], float] = random.random) -> list[Seen]:
    """The addresses to dial now, best first, at most ``limit``: idle ones
    whose node is not connected already; bootstrap and proven addresses
    first, then the least failing, ties broken by ``rank_noise`` so that
    no address is starved. Call ``book.retry_due(now)`` first."""
    if limit <= 0:
        return []
    eligible = [s for s in seen
                if book.state(s.addr) is S.IDLE and (s.node_id is None or s.node_id not in connected_ids)]
    return heapq.nsmallest(limit, eligible, key=lambda s: (not s.preferred, s.failures, rank_noise()))


def expired(failures: int, bootstrap: bool, verified: bool, since: float, now: float,
            forget_after: float, forget_verified_after: float) -> bool:
    """Whether a failing address has failed long enough to be forgotten:
    ``since`` is its last good handshake, or when it was added."""
    if failures == 0 or bootstrap:
        return False
    return now - since > (forget_verified_after if verified else forget_after)
