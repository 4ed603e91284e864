"""``shards.lease``: one job per output, locally (flock) and on gs:// (heartbeat + expiry, on the GCS emulator);
and the path relations a job refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from shards import lease, storage
from shards.typed_config import ConfigError


def test_a_local_lease_is_exclusive_and_released(tmp_path):
    output = str(tmp_path / "out")
    held = lease.acquire(output, job="preprocess")
    with pytest.raises(lease.LeaseHeld, match=r"out is being written by octjepa preprocess on .* pid "):
        lease.acquire(output, job="reshard")
    held.release()
    with lease.hold(output, job="reshard"):
        pass
    assert os.listdir(output) == []


def test_a_local_lease_dies_with_its_holder(tmp_path):
    """A process killed while holding the lease (no release, no cleanup) does not block the next run."""
    output = str(tmp_path / "out")
    code = (
        f"import os, sys; from shards import lease; lease.acquire({output!r}, job='preprocess'); "
        f"print('held', flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "held" and proc.returncode == -9
    assert os.path.exists(os.path.join(output, lease.LEASE_NAME))  # left behind, but nobody holds it
    lease.acquire(output, job="reshard").release()


def test_a_gcs_lease_is_exclusive_kept_alive_and_released(gcs):
    output = f"{gcs}/out"
    held = lease.acquire(output, job="preprocess", ttl_s=1.0, heartbeat_s=0.2)
    time.sleep(1.5)  # beyond the ttl: only the heartbeat keeps it
    with pytest.raises(lease.LeaseHeld, match="is being written by octjepa preprocess"):
        lease.acquire(output, job="reshard")
    held.release()
    assert not storage.exists(storage.join(output, lease.LEASE_NAME))
    lease.acquire(output, job="reshard").release()


def test_an_expired_gcs_lease_is_taken_over_and_its_holder_learns_it(gcs):
    output = f"{gcs}/out"
    url = storage.join(output, lease.LEASE_NAME)
    dead = {"job": "preprocess", "holder": "elsewhere pid 1", "token": "x", "heartbeat": time.time() - 10, "ttl_s": 5.0}
    storage.write_bytes(url, json.dumps(dead).encode())  # a run killed 10 s ago, with a 5 s ttl
    first = lease.acquire(output, job="reshard", ttl_s=0.5, heartbeat_s=10.0)  # no beat before its ttl runs out
    time.sleep(1.0)
    second = lease.acquire(output, job="preprocess", ttl_s=60.0)
    with pytest.raises(lease.LeaseLost, match="took over"):
        first.release()
    second.release()
    assert not storage.exists(url)


@pytest.mark.parametrize(
    "output, relation",
    [
        ("{src}", "is"),
        ("{src}/", "is"),
        ("{src}/./", "is"),
        ("{src}/by_device", "is inside"),
        ("{parent}", "is a parent of"),
        ("{parent}/../{parent_name}", "is a parent of"),
    ],
)
def test_an_output_equal_to_inside_or_above_the_input_is_refused(tmp_path, output, relation):
    src = tmp_path / "set"
    src.mkdir()
    output = output.format(src=src, parent=tmp_path, parent_name=tmp_path.name)
    with pytest.raises(ConfigError, match=f"--output .* {relation} --input"):
        lease.check_separate(str(src), output)


@pytest.mark.parametrize(
    "output, relation",
    [
        ("gs://b/sets/set", "is"),
        ("gs://b/sets/./set/", "is"),
        ("gs://b//sets/set/x", "is inside"),
        ("gs://b/sets", "is a parent of"),
    ],
)
def test_gcs_urls_are_compared_normalised(output, relation):
    with pytest.raises(ConfigError, match=f" {relation} --input"):
        lease.check_separate("gs://b/sets/set", output)


def test_a_symlink_to_the_input_is_the_input(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "set")
    with pytest.raises(ConfigError, match=" is --input"):
        lease.check_separate(str(tmp_path / "set"), str(tmp_path / "link"))
    lease.check_separate(str(tmp_path / "set"), str(tmp_path / "set2"))  # a sibling is fine
    lease.check_separate("gs://b/set", "gs://b/set2")
    lease.check_separate("gs://b/set", str(tmp_path / "set"))  # another filesystem
