"""One node per data directory and per peers file: exclusive locks held for
the life of the process.

Two nodes on one data directory would share one key, so one node id, and
each would overwrite the other's peers file with its own view, losing
registers the other acknowledged. ``flock`` locks end with the process, so
a node killed with SIGKILL leaves a lock file behind but no lock: the next
node takes it. The holder's pid is written into the lock file, so a node
refused can say who holds it.

A lock file is removed by its holder while still locked; a node that
locked a file which was removed meanwhile tries again with the new one, so
removal never lets two nodes in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import attrs

#: the lock file inside the data directory
DATA_DIR_LOCK = "foxnode.lock"
#: the peers file's lock is its sibling of this suffix: the peers file
#: itself is replaced by rename at every fold, so it cannot hold a lock.
#: The same lock guards the journal beside it (storefiles.journal_path:
#: the same real path, another suffix), which is only written by the
#: store that holds it.
PEERS_LOCK_SUFFIX = ".lock"

_ATTEMPTS = 10


class LockError(Exception):
    """The file is in use or cannot be locked; the message (one line)
    names the file and, when known, the process holding it."""


@attrs.define(eq=False)
class FileLock:
    """A held lock; ``release`` (or the process's end) lets it go."""

    path: Path
    #: what the lock guards, as said to the operator ("data directory /x")
    what: str
    _fd: int | None

    @classmethod
    def acquire(cls, path: Path, what: str) -> "FileLock":
        for _ in range(_ATTEMPTS):
            try:
                # O_NOFOLLOW: a lock file planted as a symlink is refused,
                # not followed to truncate whatever it points at.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise LockError(f"{what}: cannot open lock file {path} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                by = f"process {holder}" if holder else "another process"
                raise LockError(f"{what} is in use by {by} (it holds {path}); "
                                "is another node running on it?") from None
            except OSError as e:
                os.close(fd)
                raise LockError(f"{what}: cannot lock {path} ({e.strerror})") from None
            if _same_file(fd, path):
                lock = cls(path, what, fd)
                lock.note_pid()
                return lock
            os.close(fd)  # removed by its last holder after we opened it: again
        raise LockError(f"{what}: lock file {path} keeps being replaced")

    def note_pid(self) -> None:
        """Write this process's pid into the lock file (again after twistd
        forked into the background, where the pid changed)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the pid is only for the message
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # gone already, or its directory
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _directory_of(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LockError(f"{what}: cannot create directory {path} ({e.strerror})") from None


def lock_data_dir(data_dir: str | os.PathLike) -> FileLock:
    """Lock the data directory (made if missing) before its key is read."""
    directory = Path(os.path.realpath(data_dir))
    what = f"data directory {directory}"
    _directory_of(directory, what)
    return FileLock.acquire(directory / DATA_DIR_LOCK, what)


def lock_peers_file(peers_file: str | os.PathLike) -> FileLock:
    """Lock the peers file (the file a symlink points to, which is what is
    written) before it is read; its directory is made if missing."""
    target = Path(os.path.realpath(peers_file))
    what = f"peers file {target}"
    _directory_of(target.parent, what)
    return FileLock.acquire(target.with_name(target.name + PEERS_LOCK_SUFFIX), what)


def lock_node_files(data_dir: str | os.PathLike, peers_file: str | os.PathLike) -> list[FileLock]:
    """Both locks of a node, peers file first; none held if either fails."""
    peers = lock_peers_file(peers_file)
    try:
        if Path(os.path.realpath(data_dir)) / DATA_DIR_LOCK == peers.path:
            return [peers]  # one file guards both (a peers file named so)
        return [peers, lock_data_dir(data_dir)]
    except BaseException:
        peers.release()
        raise
