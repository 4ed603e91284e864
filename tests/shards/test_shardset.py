import io

import pytest

import shards
from tests.shards.helpers import make_shard_set


def test_write_shard_file_streams_the_same_bytes_as_write_shard(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "src"), per_device=3, devices=("topcon_triton",))
    records = [samples[k] for k in sorted(samples)[:3]]
    expected = io.BytesIO()
    shards.write_shard(expected, records)
    entry = shards.write_shard_file(str(tmp_path / "out"), "val", 3, iter(records))
    data = (tmp_path / "out" / entry["path"]).read_bytes()
    assert data == expected.getvalue()
    assert entry["num_samples"] == 3 and entry["bytes"] == len(data)
    assert [p.name for p in (tmp_path / "out" / "val").iterdir()] == ["shard-000003.tar"]  # no temporary left


def test_a_failed_shard_write_leaves_nothing(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "src"), per_device=2, devices=("topcon_triton",))

    def broken():
        yield from (samples[k] for k in sorted(samples))
        raise OSError("staged sample unreadable")

    with pytest.raises(OSError, match="unreadable"):
        shards.write_shard_file(str(tmp_path / "out"), "val", 0, broken())
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_shards_are_readable_by_webdataset(tmp_path):
    import webdataset as wds

    index, samples = make_shard_set(str(tmp_path / "set"), per_device=2, devices=("topcon_triton", "zeiss_cirrus"))
    urls = [str(tmp_path / "set" / s["path"]) for split in index["splits"].values() for s in split["shards"]]
    read = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(read) == sorted(samples)
    for key, sample in samples.items():
        assert read[key]["npy"] == sample["npy"] and read[key]["json"] == sample["json"]
