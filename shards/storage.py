"""Local paths and ``gs://`` URLs through one fsspec interface.

On GCS the filesystem is gcsfs's plain ``GCSFileSystem``. gcsfs otherwise defaults to its experimental extended
filesystem, which first probes each bucket's type (zonal, hierarchical) through the Storage Control API and waits
up to about 60 s when that fails (no permission for it, an emulator, no route to it); these jobs use no zonal or
hierarchical-namespace feature. gcsfs documents the switch as ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, read
once when gcsfs is first imported, so this module sets it (unless the environment already does) before anything
imports gcsfs: on the launching machine and on every Beam worker, which import this module before any gs:// access.
The Dataflow worker image (``dataflow/Dockerfile``) sets it too.

Tests and offline users point gcsfs at a local emulator with ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (gcsfs
reads it); an emulator takes no credentials, so access is then anonymous instead of searching for them first.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_GCS_RETRIES = 6


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _gcs_filesystem() -> Any:
    anonymous = {"token": "anon"} if os.environ.get("STORAGE_EMULATOR_HOST") else {}
    return fsspec.filesystem("gs", retries=_GCS_RETRIES, **anonymous)


def get_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path within it) for a local path or a URL.

    gcsfs instances are cached per process by fsspec; one created before a fork is not safe to use after it, so
    long-lived workers (loader workers, Beam DoFns) call this inside the worker, not at import time.
    """
    if url.startswith("gs://"):
        return _gcs_filesystem(), url[len("gs://") :]
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def check_readable(url: str) -> None:
    """Raise ``PermissionError`` naming the bucket of the gs:// ``url`` unless listing it works (the bucket exists
    and these credentials may list it). One request: it lists at most one object."""
    from gcsfs.retry import HttpError

    fs, path = get_fs(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, max_results=1)
    except (OSError, ValueError, HttpError) as exc:  # 404 / 403 / a malformed name / any other HTTP status
        reason = " ".join(str(exc).split()) or type(exc).__name__  # gcsfs puts the server's words on a 2nd line
        raise PermissionError(f"gs://{bucket} cannot be read ({type(exc).__name__}: {reason})") from exc


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
