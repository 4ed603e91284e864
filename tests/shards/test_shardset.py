import io

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
