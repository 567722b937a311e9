"""The one lock helper of the repository: an exclusive flock on a lock file that holds its owner's pid and host.

The kernel releases an flock when its holder exits, however it exits (kill -9 included), so a lock left by a
dead process is never stale: the next taker gets it. The holder deletes the file when it lets go; a taker that
locked a file deleted under it tries again on the new one.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no locking, as before there was a lock
    fcntl = None


class Held(Exception):
    """The lock is held by another live process: `owner` is what its file says ("<pid> <host>")."""

    def __init__(self, path: Path, owner: str):
        super().__init__(f"{path} is held by {owner or 'another process'}")
        self.path, self.owner = path, owner


class Lock:
    """An exclusive lock on `path`, taken with `acquire(wait)` and let go with `release()` (or as a context
    manager, waiting). `wait=False` raises Held at once when another process holds it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = True) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    owner = os.read(fd, 200).decode(errors="replace").strip()
                    os.close(fd)
                    raise Held(self.path, owner) from None
                if not same_file(fd, self.path):  # deleted by its last holder after we opened it: again
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {platform.node()}\n".encode())
            self.fd = fd
        return self

    def release(self) -> None:
        """Delete the file, then let go (in this order, so no one locks a file that is about to vanish)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Lock":
        return self.acquire(wait=True)

    def __exit__(self, *exc: object) -> None:
        self.release()


def same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for the lock on `path`, hold it for the block (one downloader or sample builder at a time)."""
    with Lock(path):
        yield
