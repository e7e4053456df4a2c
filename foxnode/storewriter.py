"""The peer store's writer: group commit onto the journal, and folds.

Group commit: while one write is on its way to the disk, every change made
meanwhile waits for the *next* write, so a burst of concurrent registers
costs one append and one fsync per group, whatever the store's size. A
commit's Deferred fires only once its group is fsynced.

Writes run on the store's own daemon thread, not the reactor's pool: a
write that hangs (a hung disk) holds neither the reactor's shutdown, which
joins its pool's threads, nor the store's ``close()``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from foxnode.storefiles import (
    DISK,
    DirectorySyncError,
    DiskOps,
    Epoch,
    StoreDurabilityError,
    StoreWriteError,
    journal_header,
    journal_path,
    peers_file_chunks,
    write_all,
    write_atomically,
)


class ThreadRunner:
    """The store's own daemon thread, running one job at a time; results
    (what the job returned, or its failure) come back on the reactor's
    thread. A daemon, so that a write hung in the kernel does not keep the
    process from exiting. The key store runs its writes on one too."""

    def __init__(self, reactor: Any, name: str = "foxnode-store-writer") -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: queue.SimpleQueue | None = None

    def run(self, write: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(self._jobs,), name=self._name,
                             daemon=True).start()
        self._jobs.put((write, args, d))
        return d

    def stop(self) -> None:
        """End the thread once its jobs are done; a later ``run`` starts another."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            write, args, d = job
            try:
                result = write(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


class StoreFiles:
    """The two files as the writer's thread sees them: the journal open
    for appending, and the epoch it belongs to. Used from one thread at a
    time (the runner's)."""

    def __init__(self, path: str | os.PathLike, epoch: Epoch, journal_size: int,
                 ops: DiskOps = DISK) -> None:
        self.path = Path(path)
        self.journal = journal_path(path)
        self.ops = ops
        self.epoch = epoch
        #: the journal's valid length; 0: it must be started anew
        self._size = journal_size
        self._highest = epoch.number
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def append(self, lines: list[bytes]) -> None:
        """Append lines to the journal and fsync it."""
        unsynced = self._open() if self._fd is None else None
        fd = self._fd
        assert fd is not None
        try:
            write_all(self.ops, fd, [b"".join(lines)])  # one write call, not one per line
            self.ops.fsync(fd)
        except BaseException:
            # Never acknowledged: cut off what may have reached the file,
            # and open it again (cutting again) before the next append.
            self._forget()
            raise
        self._size += sum(map(len, lines))
        if unsynced is not None:
            # The lines are in the journal, whose name may not survive a crash.
            raise unsynced

    def _open(self) -> DirectorySyncError | None:
        """Open the journal for appending, starting it anew if need be;
        returns a failed sync of its directory after starting it."""
        unsynced = None
        if self._size == 0:
            # Written whole, so the header is never torn, and the directory
            # synced, so the journal's name survives a crash.
            header = journal_header(self.epoch)
            try:
                write_atomically(self.journal, header, self.ops)
            except DirectorySyncError as e:
                unsynced = e
            self._size = len(header)
        fd = self.ops.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # A torn last line, left by a crash during an append.
            self.ops.truncate(fd, self._size)
        except BaseException:
            self.ops.close(fd)
            raise
        self._fd = fd
        return unsynced

    def _forget(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.ops.truncate(fd, self._size)
        except OSError:
            pass  # the fold that follows a failure starts a new journal
        try:
            self.ops.close(fd)
        except OSError:
            pass

    def fold(self, body: bytes, unregistered: tuple[str, ...] = ()) -> None:
        """Write the peers file anew, then start a new, empty journal. Each
        attempt takes a new epoch: a peers file of a later epoch than the
        journal's was folded from everything the journal holds."""
        self._highest += 1
        epoch = Epoch(self.epoch.id, self._highest)
        write_atomically(self.path, peers_file_chunks(body, epoch, unregistered), self.ops)
        self._forget()
        self._size = 0
        self.epoch = epoch
        unsynced = self._open()
        if unsynced is not None:
            raise unsynced

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.ops.close(fd)


@attrs.define(eq=False)
class Batch:
    """One group's write: ``job`` runs on the writer's thread."""

    job: Callable[[], None] | None
    #: bookkeeping changes it carries (said when a shutdown abandons it)
    changes: int = 0


class GroupWriter:
    """Runs one batch at a time; every ``commit()`` made while one runs is
    answered by the next. ``take(failed)`` makes the next batch from what
    changed meanwhile (``failed``: the last one failed)."""

    def __init__(self, reactor: Any, take: Callable[[bool], Batch], runner: Any = None,
                 on_write: Callable[[float], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._take = take
        #: what runs the jobs: the store's thread (tests hand in testing.InlineWriter)
        self.runner = runner if runner is not None else ThreadRunner(reactor)
        self._on_write = on_write
        self._on_failure = on_failure
        self.writing = False
        self._waiters: list[Deferred] = []
        self._in_flight: list[Deferred] = []
        self.in_flight_changes = 0
        self._failed = False
        #: given up (a shutdown's timeout): nothing more is acknowledged
        self.abandoned = False
        #: batches written
        self.writes = 0

    @property
    def busy(self) -> bool:
        return self.writing or bool(self._waiters)

    def commit(self) -> Deferred:
        """Fires once every change made so far is on disk."""
        if self.abandoned:
            return fail(StoreWriteError("the node is shutting down"))
        d: Deferred = Deferred()
        self._waiters.append(d)
        if not self.writing:
            self._start()
        return d

    def _start(self) -> None:
        self._in_flight, self._waiters = self._waiters, []
        batch = self._take(self._failed)
        if batch.job is None:
            # Nothing changed since the last write: all of it is on disk.
            self._failed = False
            for w in self._in_flight:
                w.callback(None)
            self._in_flight = []
            return
        self.writing = True
        self.in_flight_changes = batch.changes
        started = time.monotonic()
        self.runner.run(batch.job).addBoth(self._written, started)

    def _written(self, result: Any, started: float) -> None:
        if self.abandoned:
            return  # the shutdown gave up on it and answered its waiters
        self.writing = False
        waiters, self._in_flight = self._in_flight, []
        if isinstance(result, Failure):
            self._failed = True
            error = result.value
            if self._on_failure is not None:
                self._on_failure(error)
            if isinstance(error, DirectorySyncError):
                refusal: StoreWriteError = StoreDurabilityError(
                    f"peers file written but not confirmed durable: {describe(error)}")
            else:
                refusal = StoreWriteError(f"cannot write peers file: {describe(error)}")
            for w in waiters:
                w.errback(refusal)
        else:
            self._failed = False
            self.in_flight_changes = 0
            self.writes += 1
            if self._on_write is not None:
                self._on_write(time.monotonic() - started)
            for w in waiters:
                w.callback(None)
        if self._waiters and not self.writing:
            self._start()

    def abandon(self, why: str) -> None:
        """Answer every commit still waiting with a failure; what is in
        flight ends unheard."""
        self.abandoned = True
        waiters = self._in_flight + self._waiters
        self._in_flight, self._waiters = [], []
        for w in waiters:
            w.errback(StoreWriteError(why))

    def stop(self) -> None:
        self.runner.stop()


def describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
