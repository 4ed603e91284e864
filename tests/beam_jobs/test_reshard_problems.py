"""``octjepa reshard``: a contract problem a worker finds is data (a tagged output), which Finalise records instead of
an index and the driver raises, whatever runner ran the workers."""

from __future__ import annotations

import json
import shutil

import pytest

import shards
from beam_jobs import reshard
from beam_jobs.job import FAILED_RUN_ERRORS
from beam_jobs.reshard_files import SampleRef, ShardWrite
from shards.synthetic import make_shard_set
from tests.beam_jobs.test_reshard import _first_volume_offset, run_reshard


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source") / "set"
    make_shard_set(str(root), per_device=6, samples_per_shard=3)
    return root


def test_every_problem_is_recorded_no_shard_is_written_and_a_good_run_clears_them(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    flipped, truncated = src / "train" / "shard-000000.tar", src / "val" / "shard-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[_first_volume_offset(flipped)] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:1024])
    out = tmp_path / "out"
    with pytest.raises(shards.ContractError, match=r"\(2 problem\(s\) in all, each in .*failed-run-errors.jsonl\)"):
        run_reshard(src, out)
    problems = [json.loads(line) for line in (out / FAILED_RUN_ERRORS).read_text().splitlines()]
    assert sorted(p["message"].split(": ", 1)[0] for p in problems) == sorted([str(flipped), str(truncated)])
    assert {p["stage"] for p in problems} == {"scan"}
    assert not list(out.rglob("*.tar")) and not list(out.rglob(shards.INDEX_NAME))  # no copy after a failed scan

    report = run_reshard(source, out)
    assert report["index"]["domains"] and not (out / FAILED_RUN_ERRORS).exists()


def test_a_volume_failing_its_crc_while_copied_is_a_problem_not_a_shard(source, tmp_path):
    """The source changed after its scan: the copy finds it, routes it, and writes no shard."""
    path = source / "train" / "shard-000000.tar"
    with open(path, "rb") as f:
        record = next(shards.iter_shard(f, name=str(path)))
    offset = _first_volume_offset(path) + 1 - len(record[shards.VOLUME_EXT])
    meta = json.loads(record[shards.META_EXT])
    ref = SampleRef(
        record["__key__"],
        meta["device"],
        "train",
        meta["device"],
        str(path),
        offset,
        len(record[shards.VOLUME_EXT]),
        record[shards.META_EXT],
        b'{"json": "00000000", "npy": "00000000"}',
    )
    task = ShardWrite(meta["device"], "train", 0, (ref,))
    (out,) = reshard.WriteShardFn(str(tmp_path / "out")).process((("write",), [task]))
    assert out.tag == reshard.PROBLEMS_TAG and out.value["stage"] == "copy"
    assert str(path) in out.value["message"] and record["__key__"] in out.value["message"]
    assert not list((tmp_path / "out").rglob("*.tar"))
