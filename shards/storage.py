"""Local paths and ``gs://`` URLs through one fsspec interface.

On GCS the filesystem is gcsfs. Tests and offline users point it at a local emulator with
``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``; then credentials are anonymous and gcsfs's plain filesystem is used,
because its extended one first probes the bucket type through the Storage Control API, which an emulator does not
serve (each probe waits about 60 s before falling back).
"""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec

_GCS_RETRIES = 6


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _gcs_filesystem() -> Any:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator:
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(endpoint_url=emulator, token="anon", retries=_GCS_RETRIES)
    return fsspec.filesystem("gs", retries=_GCS_RETRIES)


def get_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path within it) for a local path or a URL.

    gcsfs instances are cached per process by fsspec; one created before a fork is not safe to use after it, so
    long-lived workers (loader workers, Beam DoFns) call this inside the worker, not at import time.
    """
    if url.startswith("gs://"):
        return _gcs_filesystem(), url[len("gs://"):]
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return url.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(url, *parts)


def open_url(url: str, mode: str = "rb") -> Any:
    fs, path = get_fs(url)
    if "w" in mode and not is_remote(url):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object so that a reader never sees half of it.

    Locally: write a temporary sibling, then rename over the target. On GCS an object appears only when its upload
    completes, so a direct write is already all-or-nothing.
    """
    fs, path = get_fs(url)
    if is_remote(url):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(url: str, *, recursive: bool = False) -> None:
    """Remove a file or (recursively) a directory if it exists."""
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
