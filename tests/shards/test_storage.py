from shards import storage


def test_local_write_is_atomic_and_readable(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(url, b"hello")
    assert storage.read_bytes(url) == b"hello"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temporary left behind


def test_gcs_round_trip_through_emulator(gcs):
    url = storage.join(gcs, "dir", "obj.bin")
    storage.write_bytes(url, b"\x00\x01payload")
    assert storage.read_bytes(url) == b"\x00\x01payload"
    assert storage.exists(url)
    storage.remove(storage.join(gcs, "dir"), recursive=True)
    fs, path = storage.get_fs(url)
    fs.invalidate_cache()
    assert not storage.exists(url)
