"""foxchain: a minimal proof-of-work ledger built on nothing but the plugin
API (foxnode.plugin): ``twistd -n foxnode --plugin chain``, or
``foxnode devnet --nodes 5 --plugin chain``.

- Blocks (block.py): ``{"height", "prev", "time", "data", "nonce",
  "difficulty", "hash"}``; the hash is SHA-256 of the canonical JSON of
  the other six; proof of work is ``difficulty`` leading zero bits
  (``MIN_DIFFICULTY`` to ``MAX_DIFFICULTY``); a block's work is
  ``2**difficulty``. The genesis block is fixed, the same everywhere.
- The ledger (ledger.py): every accepted block in ``chain.sqlite`` in the
  plugin's data directory; the best chain is the one with the most
  cumulative work, then the lowest head hash (so nodes that hold the same
  blocks agree on the head); a better fork reorganises it.
- Ops: ``mine`` ``{"data"?: JSON, "difficulty"?: int}`` mines a block on
  the head in the reactor's thread pool (one at a time per node; 409 while
  one is being mined), keeps it and publishes it; ``chain``
  ``{"recent"?: n}`` → the head ``{"height", "hash", "work"}`` and the last
  ``n`` blocks (default 10, newest first); ``block`` ``{"height"}`` or
  ``{"hash"}`` → that block or 404; ``blocks`` ``{"locator": [hash, ...],
  "limit"?}`` → the best chain after the first locator hash it holds
  (what a node that lacks blocks asks its peers).
- Spreading: a mined block is published on ``foxchain/blocks`` (ttl: the
  longest a node takes). Its validator runs at every node, on every copy:
  a block that fails its own checks (shape, hash, proof of work,
  difficulty, size, time) or does not fit its parent is refused and goes
  no further; a valid one joins the ledger and goes on. One whose parent
  the node lacks goes no further either, and the node fetches the chain it
  belongs to from its peers.
- Sync: a ``@service`` that, every ``TICK`` seconds, looks at
  ``ctx.peers()``; a peer it has not asked yet, every peer every
  ``SYNC_INTERVAL``, and all of them at once after an orphan, are asked
  for their ``chain`` (``ctx.ask``); from a peer with more work the node
  fetches ``blocks`` after its locator, ``BATCH`` at a time, until it holds
  the peer's head. So a new or returning node catches up with its peers,
  and two forks mined at once converge to the one with more work.

Bad input to an op is a 400 naming the argument; a refused block is one
log line (``foxchain: refused block ... from ...: why``); the node goes on.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred

from foxnode.plugin import OpError, op, service, validator
from foxnode.plugins.chain import block as blocks
from foxnode.plugins.chain.block import Invalid
from foxnode.plugins.chain.ledger import FILE, HEAD, KNOWN, ORPHAN, SIDE, Ledger, better

#: the topic blocks spread on
TOPIC = "foxchain/blocks"
#: the ttl blocks are published with (the longest foxnode takes by default)
TTL = 3600
#: how often the sync service looks at the peers (s)
TICK = 1.0
#: how often it asks every peer, new or not (s)
SYNC_INTERVAL = 10.0
#: blocks per ``blocks`` reply, at most
BATCH = 100
#: batches fetched from one peer in one go, at most
MAX_BATCHES = 50
#: how long a peer has to answer (s)
ASK_TIMEOUT = 5.0
#: how many blocks ``chain`` shows unless told, and at most
RECENT, MAX_RECENT = 10, 100
MAX_LOCATOR = 64

#: ctx -> its node's Chain (one per node; several nodes may share a process)
_chains: dict[Any, "Chain"] = {}


def public(b: dict[str, Any]) -> dict[str, Any]:
    """A block as ops and the topic carry it: its fields and hash."""
    return {**blocks.header(b), "hash": b["hash"]}


def summary(head: dict[str, Any]) -> dict[str, Any]:
    return {"height": head["height"], "hash": head["hash"], "work": head["work"]}


class Chain(MultiService):
    """One node's ledger and its sync with the node's peers (a
    ``TimerService`` child on the node's clock, every ``TICK``)."""

    def __init__(self, ctx: Any, ledger: Ledger) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.mining = False
        #: node ids of the peers asked since they connected
        self._asked: set[str] = set()
        self._since_all = 0.0
        self._syncing: dict[str, Deferred] = {}
        super().__init__()
        timer = TimerService(TICK, self.tick)
        timer.clock = ctx.reactor
        timer.setServiceParent(self)

    def startService(self) -> None:
        _chains[self.ctx] = self
        self._since_all = self.ctx.now()
        super().startService()

    def stopService(self) -> Deferred:
        _chains.pop(self.ctx, None)
        d = super().stopService()
        d.addBoth(lambda _: self.ledger.close())
        return d

    # -- receiving -------------------------------------------------------------------

    def receive(self, candidate: Any, source: str) -> str | None:
        """A block from ``source`` (for the log): checked and added; the
        outcome, or None when it was refused."""
        try:
            b = blocks.check(candidate, self.ctx.now())
            outcome = self.ledger.add(b)
        except Invalid as e:
            height = candidate.get("height") if isinstance(candidate, dict) else None
            self.ctx.log.warn("foxchain: refused block at height {height} from {source}: {why}",
                              height=height, source=source, why=str(e))
            return None
        if outcome == HEAD:
            self.ctx.log.info("foxchain: head is now {height} {hash} (work {work})",
                              height=b["height"], hash=b["hash"][:16], work=self.ledger.head()["work"])
        return outcome

    # -- sync ------------------------------------------------------------------------

    def tick(self) -> None:
        try:
            self._tick()
        except Exception as e:  # the timer goes on: the next tick tries again
            self.ctx.log.error("foxchain: sync round failed: {why}", why=repr(e))

    def _tick(self) -> None:
        peers = {p["node_id"]: p["addr"] for p in self.ctx.peers() if p.get("addr")}
        self._asked &= set(peers)
        due = self.ctx.now() - self._since_all >= SYNC_INTERVAL
        if due:
            self._since_all = self.ctx.now()
        for node_id, addr in peers.items():
            if due or node_id not in self._asked:
                self._asked.add(node_id)
                self.sync_with(node_id, addr)

    def sync_all(self) -> None:
        """After an orphan: ask every peer now."""
        for p in self.ctx.peers():
            if p.get("addr"):
                self.sync_with(p["node_id"], p["addr"])

    def sync_with(self, node_id: str, addr: str) -> Deferred:
        if node_id in self._syncing:
            return self._syncing[node_id]
        d = ensureDeferred(self._sync(addr))

        def done(result: Any) -> Any:
            self._syncing.pop(node_id, None)
            return result

        def failed(failure: Any) -> None:
            self.ctx.log.debug("foxchain: no sync with {addr}: {why}", addr=addr,
                               why=failure.getErrorMessage())

        d.addBoth(done).addErrback(failed)
        if not d.called:
            self._syncing[node_id] = d
        return d

    async def _sync(self, addr: str) -> int:
        """Fetch from ``addr`` what it has beyond our head; the blocks added."""
        theirs = await self.ctx.ask(addr, "chain", {"recent": 0}, timeout=ASK_TIMEOUT)
        if not isinstance(theirs, dict) or not self.running:
            return 0
        if not blocks.whole(theirs.get("work")) or not blocks.is_hash(theirs.get("hash")):
            return 0
        if not self._wants(theirs):
            return 0
        added = 0
        for _ in range(MAX_BATCHES):
            reply = await self.ctx.ask(addr, "blocks", {"locator": self.ledger.locator(), "limit": BATCH},
                                       timeout=ASK_TIMEOUT)
            got = reply.get("blocks") if isinstance(reply, dict) else None
            if not self.running or not isinstance(got, list) or not got:
                break
            progress = False
            for candidate in got[:BATCH]:
                outcome = self.receive(candidate, addr)
                if outcome is None or outcome == ORPHAN:
                    return added  # a peer that sends what does not fit: no more from it now
                if outcome in (HEAD, SIDE):
                    added += 1
                    progress = True
            if not progress or not self._wants(theirs):
                break
        return added

    def _wants(self, theirs: dict[str, Any]) -> bool:
        """Is the peer's head better than ours, and not held already?"""
        if self.ledger.get(theirs["hash"]) is not None:
            return False
        return better(theirs, self.ledger.head())

    # -- mining ------------------------------------------------------------------------

    async def mine(self, data: Any, difficulty: int) -> dict[str, Any]:
        if self.mining:
            raise OpError(409, "A block is being mined on this node already; ask again when it is done.")
        self.mining = True
        try:
            head = self.ledger.head()
            when = int(self.ctx.now())
            reactor = self.ctx.reactor
            pool = getattr(reactor, "getThreadPool", None)
            if pool is None:  # a test's Clock: no threads, mined inline
                mined = blocks.mine(head, data, when, difficulty)
            else:
                from twisted.internet.threads import deferToThreadPool
                mined = await deferToThreadPool(reactor, pool(), blocks.mine, head, data, when, difficulty)
        finally:
            self.mining = False
        if not self.running:
            raise OpError(503, "The node stopped while the block was mined; it was not kept.")
        if mined is None:
            raise OpError(503, f"No proof of work found at difficulty {difficulty} within the tries allowed.")
        outcome = self.receive(mined, "this node")
        if outcome is None:
            raise OpError(500, "The mined block was refused; the node's log says why.")
        published = None
        try:
            published = await self.ctx.publish(TOPIC, public(mined), ttl=TTL)
        except OpError as e:
            try:  # a node with a shorter --max-ttl: its default ttl
                published = await self.ctx.publish(TOPIC, public(mined))
            except OpError:
                self.ctx.log.warn("foxchain: block {hash} kept but not published: {why}",
                                  hash=mined["hash"][:16], why=str(e))
        return {"block": public(mined), "head": summary(self.ledger.head()),
                "published": published.get("id") if isinstance(published, dict) else None}


def _chain(ctx: Any) -> Chain:
    chain = _chains.get(ctx)
    if chain is None:
        raise OpError(503, "The foxchain ledger is not open (the node is starting or stopping).")
    return chain


def _whole_arg(op_name: str, args: dict, name: str, low: int, high: int, default: int) -> int:
    value = args.get(name, default)
    if not blocks.whole(value) or not low <= value <= high:
        raise OpError(400, f'Operation "{op_name}": "{name}" must be a whole number from {low} to {high}.')
    return value


def _hex(op_name: str, value: Any, name: str) -> str:
    if not blocks.is_hash(value):
        raise OpError(400, f'Operation "{op_name}": "{name}" must be a block hash, 64 lowercase hex digits.')
    return value


@service
def chain_service(ctx: Any) -> Chain:
    # A file that is not a ledger stops the node's start in one line (LedgerError).
    return Chain(ctx, Ledger.open(os.path.join(ctx.data_dir, FILE)))


@op("mine")
def op_mine(ctx: Any, args: dict) -> Deferred:
    unknown = sorted(set(args) - {"data", "difficulty"})
    if unknown:
        raise OpError(400, f'Operation "mine" takes no "{unknown[0]}" (only "data" and "difficulty").')
    data = args.get("data")
    try:
        size = len(blocks.canonical(data))
    except (TypeError, ValueError):
        raise OpError(400, 'Operation "mine": "data" must be JSON.') from None
    if size > blocks.MAX_DATA_BYTES:
        raise OpError(400, f'Operation "mine": "data" is {size} bytes as JSON, '
                           f'more than {blocks.MAX_DATA_BYTES}.')
    difficulty = _whole_arg("mine", args, "difficulty", blocks.MIN_DIFFICULTY, blocks.MAX_MINE_DIFFICULTY,
                            blocks.DEFAULT_DIFFICULTY)
    return ensureDeferred(_chain(ctx).mine(data, difficulty))


@op("chain")
def op_chain(ctx: Any, args: dict) -> dict:
    recent = _whole_arg("chain", args, "recent", 0, MAX_RECENT, RECENT)
    ledger = _chain(ctx).ledger
    return {**summary(ledger.head()), "blocks": [public(b) for b in ledger.recent(recent)]}


@op("block")
def op_block(ctx: Any, args: dict) -> dict:
    ledger = _chain(ctx).ledger
    if "hash" in args:
        digest = _hex("block", args["hash"], "hash")
        found = ledger.get(digest)
        if found is None:
            raise OpError(404, f'Block "{digest}" is not known.')
    elif "height" in args:
        height = args["height"]
        if not blocks.whole(height) or height < 0:
            raise OpError(400, 'Operation "block": "height" must be a whole number of at least 0.')
        found = ledger.at(height)
        if found is None:
            raise OpError(404, f"No block at height {height} on the best chain (its head is at "
                               f"{ledger.head()['height']}).")
    else:
        raise OpError(400, 'Operation "block" requires "height" or "hash".')
    best = ledger.at(found["height"])
    return {**public(found), "best": best is not None and best["hash"] == found["hash"]}


@op("blocks")
def op_blocks(ctx: Any, args: dict) -> dict:
    locator = args.get("locator", [])
    if not isinstance(locator, list) or len(locator) > MAX_LOCATOR:
        raise OpError(400, f'Operation "blocks": "locator" must be a list of at most {MAX_LOCATOR} block hashes.')
    locator = [_hex("blocks", h, "locator") for h in locator]
    limit = _whole_arg("blocks", args, "limit", 1, BATCH, BATCH)
    ledger = _chain(ctx).ledger
    return {**summary(ledger.head()), "blocks": [public(b) for b in ledger.after(locator, limit)]}


@validator(TOPIC)
def screen(ctx: Any, message: dict) -> bool:
    chain = _chains.get(ctx)
    if chain is None:
        return False
    source = f"node {str(message.get('origin'))[:12]}"
    outcome = chain.receive(message.get("payload"), source)
    if outcome == ORPHAN:
        # Not ours to judge yet, nor to spread: fetch the chain it is on.
        ctx.reactor.callLater(0, chain.sync_all)
        return False
    return outcome in (KNOWN, SIDE, HEAD)

