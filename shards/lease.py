"""One job per output folder, and what a job checks about its output before it writes anything.

    from shards import lease
    lease.check_separate(input_url, output_url)            # neither folder inside the other (reshard)
    with lease.hold(output_url, job="preprocess") as held:  # LeaseHeld while a live run holds the output
        lease.require_overwrite(output_url, overwrite)      # a complete set is replaced only when asked
        ... write the output ...

How a lease is held (the file ``LEASE_NAME`` inside the output):

- local paths: an exclusive ``flock`` on that file. The kernel drops the lock when its holder dies, however it dies
  (SIGKILL included), so a dead run never blocks the next one; the file's text names the holder for the refusal.
- ``gs://``: an object created only if absent (``ifGenerationMatch=0``, which GCS enforces atomically; the local
  emulator the tests use does not), holding the holder's name and the time of its last heartbeat. A thread rewrites
  it every ``heartbeat_s``; a lease whose heartbeat is older than its ``ttl_s`` belongs to a dead run and is taken
  over. GCS has no lock that dies with a process, hence heartbeat + expiry. The clocks of two machines are
  compared, so ``ttl_s`` (default 120 s) is far above any plausible skew.

A Dataflow launcher holds the lease while it waits for its job; a launcher that detaches lets it expire.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

from shards import storage
from shards.errors import OctjepaError
from shards.index import INDEX_NAME
from shards.typed_config import ConfigError

_LOG = logging.getLogger(__name__)
LEASE_NAME = ".octjepa-lease"
DEFAULT_TTL_S = 120.0


class LeaseHeld(OctjepaError):
    """Another live run holds the output; the message names it."""

    exit_code = 1


class LeaseLost(OctjepaError):
    """This run's gs:// lease was taken over while it ran (its heartbeats stopped for longer than its ttl)."""

    exit_code = 1


class OutputExists(OctjepaError):
    """The output already holds a complete set and ``--overwrite`` was not given."""


class Lease(Protocol):
    def release(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- output checks
def canonical(url: str) -> str:
    """A comparable form of a folder: ``gs://bucket/a/b`` without ``.``, ``//`` or a trailing slash; a local path
    absolute with symlinks resolved."""
    if storage.is_remote(url):
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(os.path.abspath(url))


def check_separate(
    input_url: str, output_url: str, *, input_flag: str = "--input", output_flag: str = "--output"
) -> None:
    """Refuse an output equal to, inside, or a parent of the input: writing there would replace the input's files."""
    src, dst = canonical(input_url), canonical(output_url)
    if dst == src:
        relation = "is"
    elif dst.startswith(src.rstrip("/") + "/"):
        relation = "is inside"
    elif src.startswith(dst.rstrip("/") + "/"):
        relation = "is a parent of"
    else:
        return
    raise ConfigError(
        f"{output_flag} {output_url} {relation} {input_flag} {input_url}; writing there would "
        f"replace the input's files. Choose a folder outside the input"
    )


def require_overwrite(output_url: str, overwrite: bool, *, flag: str = "--overwrite") -> None:
    """A folder holding a complete set (its index.json) is replaced only when the user asked for it."""
    index = storage.join(output_url, INDEX_NAME)
    fs, path = storage.get_fs(index)
    fs.invalidate_cache()
    if not overwrite and fs.exists(path):
        raise OutputExists(
            f"{output_url} already holds a complete set ({INDEX_NAME}); pass {flag} to replace it, "
            f"or choose another output folder"
        )


# ---------------------------------------------------------------------------------------------------- leases
@contextlib.contextmanager
def hold(
    output_url: str, *, job: str, ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float | None = None
) -> Iterator[Lease]:
    """Hold the output's lease for the duration of the block; raises LeaseHeld if a live run holds it."""
    held = acquire(output_url, job=job, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
    try:
        yield held
    finally:
        held.release()


def acquire(output_url: str, *, job: str, ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float | None = None) -> Lease:
    if storage.is_remote(output_url):
        return GcsLease(output_url, job=job, ttl_s=ttl_s, heartbeat_s=heartbeat_s or ttl_s / 4)
    return LocalLease(output_url, job=job)


def _record(job: str, token: str) -> dict[str, Any]:
    return {
        "job": job,
        "holder": f"{socket.gethostname()} pid {os.getpid()}",
        "token": token,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _held_message(output_url: str, record: dict[str, Any] | None) -> str:
    who = (
        f"octjepa {record.get('job', '?')} on {record.get('holder', '?')}, started {record.get('started', '?')}"
        if record
        else "another run"
    )
    return f"{output_url} is being written by {who}; wait for it to finish, or choose another output folder"


class LocalLease:
    """An exclusive flock on ``<output>/LEASE_NAME``; the kernel releases it when this process dies."""

    def __init__(self, output_url: str, *, job: str):
        self._path = os.path.join(output_url, LEASE_NAME)
        self._fd: int | None = None
        os.makedirs(output_url, exist_ok=True)
        while self._fd is None:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                text = os.read(fd, 1 << 16)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LeaseHeld(_held_message(output_url, _parse(text))) from None
            # A releasing holder unlinks the file before unlocking it: a lock on an unlinked file holds nothing.
            if _same_file(fd, self._path):
                self._fd = fd
            else:
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps(_record(job, uuid.uuid4().hex)).encode())

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        os.close(fd)  # drops the lock


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class GcsLease:
    """``<output>/LEASE_NAME`` on GCS, created only if absent and kept alive by a heartbeat thread."""

    def __init__(self, output_url: str, *, job: str, ttl_s: float, heartbeat_s: float):
        self._url = storage.join(output_url, LEASE_NAME)
        self._fs, self._path = storage.get_fs(self._url)
        self._ttl_s, self._token = ttl_s, uuid.uuid4().hex
        self._record = {**_record(job, self._token), "ttl_s": ttl_s}
        self.lost = False
        current = self._read()
        if current is not None:
            age = time.time() - float(current.get("heartbeat", 0))
            if age <= float(current.get("ttl_s", DEFAULT_TTL_S)):
                raise LeaseHeld(_held_message(output_url, current))
            _LOG.warning(
                "%s: taking over the lease of %s, whose last heartbeat was %.0f s ago",
                output_url,
                current.get("holder", "?"),
                age,
            )
            self._fs.rm(self._path)
        try:
            self._fs.pipe_file(self._path, self._encode(), mode="create")
        except FileExistsError:  # another run created it between our read and our write
            raise LeaseHeld(_held_message(output_url, self._read())) from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="octjepa-lease", daemon=True)
        self._thread.start()

    def _encode(self) -> bytes:
        return json.dumps({**self._record, "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return _parse(self._fs.cat_file(self._path)) or {}
        except FileNotFoundError:
            return None

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                current = self._read()
                if current is None or current.get("token") != self._token:
                    self.lost = True
                    _LOG.error("%s: this run's lease was taken over by %s", self._url, (current or {}).get("holder"))
                    return
                self._fs.pipe_file(self._path, self._encode())
            # Any failure of one beat (gcsfs has retried it already) is logged and the next beat tries again: the
            # ttl allows several misses, and a lease lost meanwhile is reported by release().
            except Exception as exc:  # noqa: BLE001
                _LOG.warning("%s: lease heartbeat failed (%s: %s)", self._url, type(exc).__name__, exc)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        current = self._read()
        if current is not None and current.get("token") == self._token:
            self._fs.rm(self._path)
        elif not self.lost:
            self.lost = True
        if self.lost:
            raise LeaseLost(
                f"{self._url}: another run took over this output while this run wrote it (no heartbeat "
                f"for over {self._ttl_s:.0f} s); do not trust its contents, re-run with --overwrite"
            )
