"""Tar shards: deterministic WebDataset tars written all or nothing while hashed, read member by member (or as a
stream), and the shard files of a set (``<split>/shard-NNNNNN.tar``) that an earlier run left. What makes a folder
of them a complete set, its ``index.json``, is ``shards.index``'s.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from shards import storage
from shards.checksum import crc32c
from shards.contract import MEMBER_EXTS, SPLITS, ContractError

# Every member gets this mtime so the same samples give byte-identical tars on every run (2020-01-01T00:00:00Z).
# An int: tarfile gives a member with a float mtime its own PAX header, twice the headers for every reader to parse.
TAR_MTIME = 1577836800
# Default shard size, "a few hundred MB": large enough for streaming reads, small enough to retry a failed write.
TARGET_SHARD_BYTES = 256 << 20
# Bytes read per call when a read is checksummed on the way: small enough to stay in a core's cache until the
# checksum has read them (measured on a 2-core EPYC VM: 1 MiB chunks cost 0.3 ms less per 9 MiB volume than a
# whole read then a checksum pass), large enough that the calls themselves cost nothing.
_CRC_CHUNK = 1 << 20


def shard_name(split: str, number: int) -> str:
    """Relative path of shard ``number`` of ``split`` inside a shard set."""
    return f"{split}/shard-{number:06d}.tar"


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and on every run (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def write_shard(fileobj: BinaryIO, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write encoded samples, in the given order, as a deterministic WebDataset tar; returns the number written.

    Plain ``tarfile`` (no webdataset import: webdataset imports torch whenever it is installed, which a Beam worker
    must not pay for). Every member has the same mtime, owner and mode, so the same samples give the same bytes.
    A record must hold every member of the contract (``encode_sample`` makes them), its checksums included.
    """
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            missing = [ext for ext in MEMBER_EXTS if ext not in sample]
            if missing:
                raise ContractError(
                    f"sample {key}: cannot be written without member(s) {missing} "
                    f"(records come from shards.encode_sample)"
                )
            for ext in MEMBER_EXTS:
                data = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
                info.uname = info.gname = "octjepa"
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def _split_member_name(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key is everything before the first dot of the last path component.
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext


class MemberReader:
    """A tar member not read yet, of a seekable shard: read it (or part of it) straight into the caller's buffer.

    Reads seek to absolute offsets, so a reader stays valid while its shard file is open: in ``iter_shard``, until
    the iterator moves past that shard. Truncation raises ContractError naming the shard and the member.
    """

    def __init__(self, fileobj: BinaryIO, info: tarfile.TarInfo, shard: str) -> None:
        self._f, self._start, self.size, self.name, self.shard = fileobj, info.offset_data, info.size, info.name, shard

    def _check(self, got: int, want: int, offset: int) -> None:
        if got != want:
            raise ContractError(
                f"shard {self.shard}: member {self.name!r} is truncated ({got} of {want} bytes "
                f"from offset {offset} of {self.size})"
            )

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        size = self.size - offset if size is None else min(size, self.size - offset)
        self._f.seek(self._start + offset)
        data = self._f.read(size)
        self._check(len(data), size, offset)
        return data

    def readinto(
        self, buf: Any, offset: int = 0, fileobj: BinaryIO | None = None, crc: int | None = None
    ) -> int | None:
        """Fill ``buf`` (a writable buffer, e.g. a C-contiguous array) with ``len(buf)`` bytes from ``offset``;
        ``fileobj``: the same shard opened again, for a read after the iterator has closed it.

        With ``crc`` (a running CRC32C, e.g. of the member's bytes before ``offset``), returns it continued over the
        bytes read: they are read in chunks and each chunk is checksummed while it is still in the CPU cache, which
        costs about half of a second pass over a volume-sized buffer."""
        f = self._f if fileobj is None else fileobj
        view = memoryview(buf).cast("B")
        if offset + view.nbytes > self.size:
            raise ValueError(f"{self.name}: {view.nbytes} bytes from offset {offset} overrun the member ({self.size})")
        f.seek(self._start + offset)
        step = view.nbytes if crc is None else _CRC_CHUNK
        done = 0
        while done < view.nbytes:  # a file object may return fewer bytes than asked before its end
            got = f.readinto(view[done : done + step])
            if not got:
                break
            if crc is not None:
                crc = crc32c(view[done : done + got], crc)
            done += got
        self._check(done, view.nbytes, offset)
        return crc


def iter_shard(fileobj: BinaryIO, *, name: str = "<shard>", defer: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Yield encoded samples ``{"__key__", "crc32c", "json", "npy"}`` (member bytes by extension, as written;
    nothing is checked here, ``decode_sample`` checks) from a shard file object; raise ContractError naming the
    shard when the tar is corrupt or truncated.

    A seekable file is read with random access (one read per member): as a stream, tarfile pulls each multi-MB
    volume through its 10 KiB record buffer, 5-10x the CPU. Non-seekable readers (pipes, hashing wrappers) are
    streamed. Members are grouped into samples by key, as WebDataset groups them. Members whose extension is in
    ``defer`` come as a ``MemberReader`` instead of bytes when the file is seekable (the loader reads volumes
    straight into its batches); truncation then surfaces on the caller's read.
    """
    seekable = getattr(fileobj, "seekable", lambda: False)()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tar:
            sample: dict[str, Any] | None = None
            while (info := tar.next()) is not None:
                tar.members = []  # tarfile keeps every header it has read; a shard can hold thousands
                if not info.isreg():
                    continue
                key, ext = _split_member_name(info.name)
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                if ext in sample:
                    raise ContractError(f"shard {name}: member {info.name!r} appears twice")
                if not seekable:
                    sample[ext] = tar.extractfile(info).read()
                else:
                    member = MemberReader(fileobj, info, name)
                    # One read straight from the file (tarfile's extractfile copies every byte twice).
                    sample[ext] = member if ext in defer else member.read()
            if sample is not None:
                yield sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ContractError(f"shard {name}: unreadable tar ({type(exc).__name__}: {exc})") from exc


class HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it (e.g. by a tar reader)."""

    def __init__(self, fileobj: Any) -> None:
        self._f, self.digest, self.size = fileobj, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        # A tar reader stops at the end-of-archive marker; the hash covers the file to its last byte.
        while self.read(1 << 22):
            pass


def sha256_of(fileobj: BinaryIO) -> tuple[str, int]:
    """(hex sha256, byte count) of a file object read to its end."""
    reader = HashingReader(fileobj)
    reader.drain()
    return reader.digest.hexdigest(), reader.size


class _HashingWriter:
    """A write-only file wrapper that hashes and counts every byte written through it, in large chunks.

    tarfile writes 512-byte headers and 16 KiB data chunks: one hash update and one write per 8 MiB instead of
    thousands of small calls per shard (each of which releases and re-takes the GIL next to the runner's threads).
    """

    def __init__(self, fileobj: Any, chunk: int = 8 << 20) -> None:
        self._f, self.digest, self.size = fileobj, hashlib.sha256(), 0
        self._buf, self._pos = bytearray(chunk), 0

    def write(self, data: bytes) -> int:
        n = len(data)
        if self._pos + n > len(self._buf):
            self._drain()
        if n > len(self._buf):
            self._emit(data)
        else:
            self._buf[self._pos : self._pos + n] = data
            self._pos += n
        return n

    def tell(self) -> int:
        return self.size + self._pos

    def flush(self) -> None:
        self._drain()
        self._f.flush()

    def _drain(self) -> None:
        if self._pos:
            with memoryview(self._buf)[: self._pos] as view:
                self._emit(view)
            self._pos = 0

    def _emit(self, data: Any) -> None:
        self.digest.update(data)
        self.size += len(data)
        self._f.write(data)


def write_shard_file(root: str, split: str, number: int, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Write one shard of a set, streamed to its destination while hashing, and return its index entry
    ``{split, path, num_samples, bytes, sha256}``.

    All or nothing: locally a temporary sibling is renamed over the target; on GCS the object appears only when its
    upload completes, and a failed write discards the upload instead of committing half a tar. Memory stays at
    one sample, however large the shard.
    """
    path = shard_name(split, number)
    url = storage.join(root, path)
    fs, fspath = storage.get_fs(url)
    remote = storage.is_remote(url)
    target = fspath
    if not remote:
        os.makedirs(os.path.dirname(os.path.abspath(fspath)), exist_ok=True)
        target = os.path.join(
            os.path.dirname(os.path.abspath(fspath)), f".{os.path.basename(fspath)}.tmp-{uuid.uuid4().hex}"
        )
    f = fs.open(target, "wb")
    writer = _HashingWriter(f)
    try:
        count = write_shard(writer, records)
        writer.flush()
        if not remote:
            os.fsync(f.fileno())
    except BaseException:
        if remote and hasattr(f, "discard"):
            f.discard()
        else:
            f.close()
            fs.rm(target)
        raise
    f.close()
    if not remote:
        os.replace(target, fspath)
    return {
        "split": split,
        "path": path,
        "num_samples": count,
        "bytes": writer.size,
        "sha256": writer.digest.hexdigest(),
    }


# Shard files, and temporaries of interrupted writes, as write_shard_file names them.
_SHARD_FILE = re.compile(r"shard-\d{6}\.tar")
_TEMP_FILE = re.compile(r"\.shard-\d{6}\.tar\.tmp-[0-9a-f]+")


def remove_stale_shards(root: str, keep: set[str]) -> list[str]:
    """Delete shard files (and temporaries of interrupted writes) under ``root/<split>/`` that are not in ``keep``
    (relative paths such as ``train/shard-000000.tar``); returns what was removed. Writers call this just before
    writing ``index.json``, so a re-run over an earlier output leaves exactly the files its index lists."""
    fs, base = storage.get_fs(root)
    fs.invalidate_cache()  # a listing cached before this run's shards were written would hide or resurrect files
    removed = []
    for split in SPLITS:
        folder = posixpath.join(base, split)
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if (_SHARD_FILE.fullmatch(name) and f"{split}/{name}" not in keep) or _TEMP_FILE.fullmatch(name):
                fs.rm(path)
                removed.append(f"{split}/{name}")
    return removed
