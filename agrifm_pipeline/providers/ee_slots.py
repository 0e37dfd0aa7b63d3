"""A limit on concurrent Earth Engine requests shared by every process that sees one directory.

Earth Engine counts concurrent requests per Cloud project (40 by default),
whatever process or machine sends them. A semaphore inside one process cannot
hold that: three Dagster step processes with 16 threads each already send 48.

:class:`SlotDirectory` is a counting semaphore made of ``slots`` lock files in
a directory. A request holds one slot for its duration: it takes an exclusive
``flock`` on one of the files (without waiting, trying the files in a random
order) and releases it when the request ends. How it holds:

- threads of one process: each attempt opens its own file description, and
  ``flock`` locks conflict between descriptions, also within one process;
- processes of one node: the kernel arbitrates the locks; a process that dies
  loses its locks at once, so a crash never leaks a slot;
- several nodes: put the directory on a file system whose locks are
  cluster-wide (NFSv4, where Linux turns ``flock`` into NFS byte-range locks;
  CephFS; Lustre or GPFS mounted with flock support). A node that dies loses
  its locks when its lease with the server expires.

Where no such file system exists, the alternative integration point is the
orchestrator's: run the acquisition steps in a Dagster pool of ``p`` slots
(pools are instance-wide, so the whole cluster shares them) and give the
provider ``max_concurrent=k`` with ``p * k`` below the quota; the provider
accepts any object with this class's ``slot()`` context manager as its
``limiter``, for example one backed by a database or a dask semaphore.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from agrifm_pipeline.errors import SettingsError

#: Environment variable naming the shared slot directory (default: one per node and project).
SLOTS_DIR_ENV = "RS_EMBED_AGRIFM_GEE_SLOTS_DIR"


class Limiter(Protocol):
    """What the Earth Engine provider needs from a concurrency limit."""

    slots: int

    def slot(self) -> AbstractContextManager[None]:
        """Hold one slot for the duration of the ``with`` block."""
        ...


def default_slots_dir(project: str | None) -> Path:
    """``$RS_EMBED_AGRIFM_GEE_SLOTS_DIR`` if set, else a directory per project in the node's temp dir."""
    env = os.environ.get(SLOTS_DIR_ENV)
    if env:
        return Path(env)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (project or "default"))
    return Path(tempfile.gettempdir()) / "agrifm-gee-slots" / name


class SlotDirectory:
    """``slots`` concurrent holders across every thread and process using ``directory``."""

    def __init__(self, directory: str | Path, slots: int, *, poll_s: float = 0.005,
                 max_poll_s: float = 0.1) -> None:  # fmt: skip
        if slots < 1:
            raise SettingsError(f"slots={slots}; use 1 or more")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(
                f"cannot create the Earth Engine slot directory {self.directory} ({exc}); "
                f"set {SLOTS_DIR_ENV} to a writable directory shared by the workers"
            ) from exc
        self.slots = slots
        self.poll_s, self.max_poll_s = poll_s, max_poll_s
        self._paths = [self.directory / f"slot-{i:03d}.lock" for i in range(slots)]
        self.held_max = 0  # most slots this object's users held at once
        self._held = 0
        self._lock = threading.Lock()

    def _try(self) -> int | None:
        """An fd holding a free slot's lock, or None when every slot is taken."""
        for path in random.sample(self._paths, len(self._paths)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
        return None

    @contextmanager
    def slot(self) -> Iterator[None]:
        delay = self.poll_s
        while (fd := self._try()) is None:
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(self.max_poll_s, delay * 2)
        with self._lock:
            self._held += 1
            self.held_max = max(self.held_max, self._held)
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
