"""gs:// end to end: manifest, participants and DICOMs read from, and shards written to, a local GCS emulator.

The ``gcs`` fixture (tests/conftest.py) serves 127.0.0.1 only and sets STORAGE_EMULATOR_HOST, which the Beam worker
processes inherit; they create their gcsfs client in ``DoFn.setup``. No credentials, no other network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from beam_jobs import preprocess
from shards import lease, read_index, storage
from synth.dataset import generate_dataset
from tests.beam_jobs.test_preprocess import check_nothing_lost, job_args, manifest_uids
from tests.beam_jobs.worker_evidence import counting_workers


def test_gcs_in_gcs_out(gcs: str, tmp_path: Path):
    assert os.environ["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    dataset = generate_dataset(f"{gcs}/aireadi", participants=2, scale=0.1, seed=5)
    assert dataset["manifest"].startswith("gs://")
    output = f"{gcs}/shards"
    storage.write_bytes(f"{output}/index.json", b"{}")  # an earlier set's index, which the run replaces
    with pytest.raises(lease.OutputExists, match="--overwrite"):
        preprocess.run(job_args(dataset, output))
    with lease.hold(output, job="test"), pytest.raises(lease.LeaseHeld, match="octjepa test on"):
        preprocess.run(job_args(dataset, output, "--overwrite"))
    assert storage.read_bytes(f"{output}/index.json") == b"{}"

    with counting_workers():
        report = preprocess.run(
            job_args(dataset, output, "--samples-per-shard", "3", "--direct_num_workers", "2", "--overwrite")
        )

    index = read_index(output)
    assert index == report["index"]
    assert index["config"]["manifest"] == dataset["manifest"] and index["config"]["data_root"].startswith("gs://")
    samples, errors = check_nothing_lost(output, manifest_uids(dataset["manifest"]))
    assert sum(len(v) for v in samples.values()) > 0
    assert sum(v for k, v in report["counters"].items() if k.startswith("worker_pid_")) == report["counters"]["samples"]
    fs, path = storage.get_fs(output)
    fs.invalidate_cache()
    listed = {p.split("/shards/", 1)[1] for p in fs.find(path)}
    shards = {s["path"] for e in index["splits"].values() for s in e["shards"]}
    assert listed == shards | {"index.json", "errors.jsonl"}
    # Nothing was written locally instead.
    assert not any(Path.cwd().glob("gs:*"))
