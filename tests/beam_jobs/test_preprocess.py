"""The preprocessing job end to end on a tiny synthetic dataset (local FnApiRunner, real worker processes).

One run on two workers is shared by most assertions; a second run on one worker checks byte-identical output; a
killed run and a re-run check that an existing output is replaced cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from beam_jobs import preprocess
from shards import ContractError, decode_sample, iter_shard, read_index, sha256_of, storage
from shards.typed_config import ConfigError
from synth.dataset import generate_dataset
from tests.beam_jobs.worker_evidence import counting_workers

TINY = ["--set", "target_shape=[8,24,24]", "--set", "target_spacing_mm=[0.2,0.05,0.1]"]


def job_args(dataset: dict[str, Any], output: str, *extra: str, participants: bool = True) -> list[str]:
    args = ["--manifest", dataset["manifest"], "--data-root", dataset["root"], "--output", output, *TINY]
    if participants:
        args += ["--participants", dataset["participants_tsv"]]
    return args + list(extra)


def manifest_uids(manifest_url: str) -> list[str]:
    lines = storage.read_bytes(manifest_url).decode().splitlines()
    heading = lines[0].split("\t")
    col = heading.index("sop_instance_uid")
    return [f[col] for f in (line.split("\t") for line in lines[1:] if line.strip()) if len(f) == len(heading)]


def read_errors(output: str) -> list[dict[str, Any]]:
    text = storage.read_bytes(storage.join(output, "errors.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def read_samples(output: str) -> dict[str, list[tuple[Any, dict[str, Any]]]]:
    """{shard path: [(volume, meta), ...]} for every shard the index lists, checked against the index entry."""
    index = read_index(output)
    out = {}
    for split, entry in index["splits"].items():
        for shard in entry["shards"]:
            url = storage.join(output, shard["path"])
            with storage.open_url(url, "rb") as f:
                assert sha256_of(f) == (shard["sha256"], shard["bytes"]), f"{url} differs from its index entry"
            with storage.open_url(url, "rb") as f:
                samples = [decode_sample(s) for s in iter_shard(f, name=url)]
            assert len(samples) == shard["num_samples"] and all(m["split"] == split for _, m in samples)
            out[shard["path"]] = samples
    return out


def check_nothing_lost(output: str, expected_uids: list[str]) -> tuple[dict, list[dict]]:
    """selected rows == samples + error lines, and every UID appears exactly once across shards and errors."""
    index = read_index(output)
    samples = read_samples(output)
    errors = read_errors(output)
    n_samples = sum(len(v) for v in samples.values())
    assert index["selected"] == n_samples + len(errors)
    assert sum(index["counts"]["by_split"].values()) == n_samples
    assert index["errors"]["count"] == len(errors)
    seen = [m["sop_instance_uid"] for v in samples.values() for _, m in v] + [e["sop_instance_uid"] for e in errors]
    assert sorted(seen) == sorted(expected_uids)
    assert len(set(seen)) == len(seen)
    return samples, errors


def files_under(root: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("aireadi"))
    return generate_dataset(root, participants=4, scale=0.1, seed=3)


@pytest.fixture(scope="module")
def first(dataset: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = str(tmp_path_factory.mktemp("out") / "first")
    with counting_workers():  # worker_pid_* and volumes_on_workers_with_torch counters
        report = preprocess.run(job_args(dataset, output, "--samples-per-shard", "2", "--direct_num_workers", "2"))
    return {"output": output, **report}


def test_nothing_lost_and_every_uid_once(first: dict[str, Any], dataset: dict[str, Any]):
    samples, errors = check_nothing_lost(first["output"], manifest_uids(dataset["manifest"]))
    assert first["index"]["manifest_rows"] == dataset["volumes"] == first["index"]["selected"]
    assert sum(len(v) for v in samples.values()) >= dataset["volumes"] - 2  # only radial ONH scans may be rejected
    assert {e["reason"] for e in errors} <= {"non_raster_scan"}
    for e in errors:
        assert e["stage"] == "decode" and e["key"] and e["row"] >= 1 and e["filepath"] and e["message"]


def test_both_worker_processes_did_work(first: dict[str, Any]):
    per_worker = {k: v for k, v in first["counters"].items() if k.startswith("worker_pid_")}
    assert len(per_worker) == 2, per_worker
    assert all(v > 0 for v in per_worker.values())
    assert sum(per_worker.values()) == first["counters"]["samples"]


def test_workers_never_import_torch(first: dict[str, Any]):
    """This environment has torch; Beam workers must not import it (~650 MB and seconds per worker)."""
    assert first["counters"]["samples"] > 0
    assert first["counters"].get("volumes_on_workers_with_torch", 0) == 0


def test_shards_sorted_named_and_counted_in_the_index(first: dict[str, Any]):
    index, samples = first["index"], read_samples(first["output"])
    by_split_device: dict[str, dict[str, int]] = {}
    for path, items in samples.items():
        split, name = path.split("/")
        assert name.startswith("shard-") and name.endswith(".tar") and len(name) == len("shard-000000.tar")
        keys = [m["key"] for _, m in items]
        assert keys == sorted(keys)
        for volume, meta in items:
            assert list(volume.shape) == [8, 24, 24]
            by_split_device.setdefault(split, {}).setdefault(meta["device"], 0)
            by_split_device[split][meta["device"]] += 1
    assert index["counts"]["by_split_device"] == by_split_device
    assert index["config"]["samples_per_shard"] == 2
    assert index["config"]["preprocess"]["target_shape"] == [8, 24, 24]
    assert index["created_by"] == "beam_jobs.preprocess"


def test_options_are_parsed_once_validated_and_are_what_the_index_records(
    first: dict[str, Any], dataset: dict[str, Any]
):
    opts, beam_args = preprocess.parse_options(
        job_args(dataset, "elsewhere", "--samples-per-shard", "2", "--direct_num_workers", "2")
    )
    assert beam_args == ["--direct_num_workers", "2"]
    assert opts.output == os.path.abspath("elsewhere") and opts.preprocess.target_shape == (8, 24, 24)
    assert first["index"]["config"] == opts.recorded()  # the output path is not part of it
    for flag, value in (("--samples-per-shard", "0"), ("--val-fraction", "1.5")):
        with pytest.raises(ConfigError, match=flag):
            preprocess.parse_options(job_args(dataset, "elsewhere", flag, value))


def test_splits_follow_recommended_split(first: dict[str, Any], dataset: dict[str, Any]):
    lines = Path(dataset["participants_tsv"]).read_text().splitlines()
    col = lines[0].split("\t").index("recommended_split")
    recommended = {line.split("\t")[0]: line.split("\t")[col] for line in lines[1:]}
    split_of: dict[str, set[str]] = {}
    for items in read_samples(first["output"]).values():
        for _, meta in items:
            split_of.setdefault(meta["participant_id"], set()).add(meta["split"])
    assert split_of and all(splits == {recommended[pid]} for pid, splits in split_of.items())


def test_same_inputs_give_byte_identical_output(first: dict[str, Any], dataset: dict[str, Any], tmp_path: Path):
    """A second run into a fresh folder, on one worker instead of two, writes the same bytes."""
    output = str(tmp_path / "second")
    preprocess.run(job_args(dataset, output, "--samples-per-shard", "2", "--direct_num_workers", "1"))
    a, b = files_under(first["output"]), files_under(output)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert any(name.endswith(".tar") for name in a)


def test_killed_run_leaves_no_index_and_a_rerun_replaces_the_output(
    first: dict[str, Any], dataset: dict[str, Any], tmp_path: Path
):
    output = str(tmp_path / "reused")
    shutil.copytree(first["output"], output)
    # Leftovers of an earlier, differently sharded run and of an interrupted write.
    Path(output, "train", "shard-000077.tar").write_bytes(b"stale")
    Path(output, "val", ".shard-000000.tar.tmp-0123abcd").write_bytes(b"partial")

    args = job_args(dataset, output, "--samples-per-shard", "2", "--direct_num_workers", "1", "--overwrite")
    proc = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.preprocess", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while Path(output, "index.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its Beam worker processes (its own session)
        proc.wait(timeout=30)
    assert not Path(output, "index.json").exists()
    with pytest.raises(ContractError, match="not a complete shard set"):
        read_index(output)

    # Re-run over the partial output: bigger shards, hash splits (no participants.tsv).
    report = preprocess.run(
        job_args(dataset, output, "--samples-per-shard", "100", "--direct_num_workers", "1", participants=False)
    )
    index = report["index"]
    listed = {s["path"] for e in index["splits"].values() for s in e["shards"]}
    assert set(files_under(output)) == listed | {"index.json", "errors.jsonl"}
    assert all(len(e["shards"]) == 1 for e in index["splits"].values())
    assert set(index["splits"]) <= {"train", "val"}
    check_nothing_lost(output, manifest_uids(dataset["manifest"]))
    assert index["counts"]["by_device"] == first["index"]["counts"]["by_device"]


def _fake_samples(n: int) -> list[dict[str, Any]]:
    import numpy as np

    from shards import encode_sample
    from shards.synthetic import fake_meta

    out = []
    for i in range(n):
        volume = np.full((2, 3, 4), i, dtype=np.uint8)
        out.append(encode_sample(volume, fake_meta("zeiss_cirrus", i, "L", (2, 3, 4), "train")))
    return out
