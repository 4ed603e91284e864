"""Shared fixtures: a local GCS emulator for every gs:// test (no credentials, loopback only)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator() -> str:
    """Start gcp-storage-emulator on 127.0.0.1 in its own process; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from gcp_storage_emulator.__main__ import main; sys.exit(main())",
            "start",
            "--host=127.0.0.1",
            f"--port={port}",
            "--in-memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}") from None
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("gcp-storage-emulator did not start within 30 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def gcs(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the emulator; ``STORAGE_EMULATOR_HOST`` is set for this test (and its subprocesses).

    Yields the bucket URL, e.g. ``gs://test-1a2b3c4d``.
    """
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    from shards import storage

    bucket = f"test-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.get_fs(f"gs://{bucket}")
    fs.mkdir(bucket)
    fs.invalidate_cache()
    yield f"gs://{bucket}"
