"""The writer<->reader contract: a real tar read back by WebDataset's own reader, and the validators' refusals."""

from __future__ import annotations

import copy
import io
import itertools
import json

import google_crc32c
import numpy as np
import pytest
import webdataset as wds

import shards
from shards import checksum
from shards.synthetic import fake_meta, make_shard_set
from tests.shards.helpers import rewritten


def _sample(shape=(3, 5, 7), dtype=np.uint8, seed=0):
    volume = np.random.default_rng(seed).integers(0, 200, size=shape).astype(dtype)
    meta = fake_meta("topcon_triton", 7, "L", shape, "train")
    meta["dtype"] = str(volume.dtype)
    return volume, meta


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_through_a_real_tar_and_webdatasets_reader(tmp_path):
    originals = {}
    records = []
    for i, dtype in enumerate([np.uint8, np.uint16, np.uint8]):
        volume, meta = _sample(shape=(2 + i, 4, 6), dtype=dtype, seed=i)
        meta = fake_meta("zeiss_cirrus", i, "R", volume.shape, "val") | {"dtype": str(volume.dtype)}
        originals[meta["key"]] = (volume, meta)
        records.append(shards.encode_sample(volume, meta))
    entry = shards.write_shard_file(str(tmp_path), "val", 0, records)
    assert entry["num_samples"] == 3

    # WebDataset's own pipeline, no decoding stage: the reader gets member bytes keyed by extension.
    dataset = wds.WebDataset(str(tmp_path / entry["path"]), shardshuffle=False)
    seen = {}
    for sample in dataset:
        volume, meta = shards.decode_sample(sample)
        seen[meta["key"]] = (volume, meta)
    assert sorted(seen) == sorted(originals)
    for key, (volume, meta) in originals.items():
        got_volume, got_meta = seen[key]
        assert got_volume.dtype == volume.dtype and got_volume.shape == volume.shape
        np.testing.assert_array_equal(got_volume, volume)
        assert got_meta == meta


def test_written_shards_are_byte_identical_across_runs(tmp_path):
    a, _ = make_shard_set(str(tmp_path / "a"), per_device=4, seed=3)
    b, _ = make_shard_set(str(tmp_path / "b"), per_device=4, seed=3)
    assert shards.encode_index(a) == shards.encode_index(b)
    for split in a["splits"]:
        for shard in a["splits"][split]["shards"]:
            assert (tmp_path / "a" / shard["path"]).read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()


# ---------------------------------------------------------------------------------------------- refusals
def _refusal(volume, meta):
    with pytest.raises(shards.ContractError) as info:
        shards.validate_sample(volume, meta)
    return str(info.value)


def test_wrong_format_version_is_refused_naming_field_and_key():
    volume, meta = _sample()
    meta["format_version"] = shards.FORMAT_VERSION + 1
    message = _refusal(volume, meta)
    assert "format_version" in message and meta["key"] in message


@pytest.mark.parametrize("stored, declared", [(np.float32, "float32"), (np.uint8, "uint16"), (np.int16, "int16")])
def test_wrong_dtype_is_refused_naming_field_and_key(stored, declared):
    volume, meta = _sample()
    volume = volume.astype(stored)
    meta["dtype"] = declared
    message = _refusal(volume, meta)
    assert "dtype" in message and meta["key"] in message


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 8), (1, 3, 5, 7)])
def test_wrong_shape_is_refused_naming_field_and_key(shape):
    volume, meta = _sample()
    volume = np.zeros(shape, dtype=np.uint8)
    message = _refusal(volume, meta)
    assert "shape" in message and meta["key"] in message


@pytest.mark.parametrize("field", sorted(shards.META_FIELDS))
def test_missing_field_is_refused_naming_field_and_key(field):
    volume, meta = _sample()
    del meta[field]
    message = _refusal(volume, meta)
    assert repr(field) in message
    if field != "key":
        assert meta["key"] in message


def test_decode_refuses_a_member_that_is_missing_or_a_key_that_disagrees():
    volume, meta = _sample()
    record = shards.encode_sample(volume, meta)
    with pytest.raises(shards.ContractError, match=f"{meta['key']}.*'npy' is missing"):
        shards.decode_sample({k: v for k, v in record.items() if k != "npy"})
    other = rewritten(record, json=json.dumps(dict(meta, key="someone_else")).encode())
    with pytest.raises(shards.ContractError, match="field 'key'"):
        shards.decode_sample(other)
    with pytest.raises(shards.ContractError, match=f"{meta['key']}.*undecodable"):
        shards.decode_sample(rewritten(record, npy=b"not an npy file"))


# ---------------------------------------------------------------------------------------------- keys
def test_make_key_is_dot_free_and_keeps_uids_apart():
    uids = ["1.2.3.4", "1.2.34", "12.3.4", "1.2.3-4", "1.2.3_4", "x1-2-3-4", "1-2-3-4"]
    keys = [shards.make_key("topcon_triton", "1001", uid) for uid in uids]
    assert all("." not in k for k in keys)
    assert len(set(keys)) == len(keys)


ADVERSARIAL_PARTICIPANTS = [
    "1001",
    "1001.",
    "1001-",
    "1001-2e-",
    "1001_",
    "10 01",
    "10/01",
    "ü1001",
    "1001__x",
    "__",
    "-",
    "_-_",
    ".",
    "1001__topcon_triton",
]


def test_make_key_is_unique_over_adversarial_participant_ids():
    combos = list(
        itertools.product(
            ["topcon_triton", "zeiss_cirrus"], ADVERSARIAL_PARTICIPANTS, ["1.2.3", "1.2.3.4", "uid.with.letters"]
        )
    )
    keys = [shards.make_key(*c) for c in combos]
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert len(set(keys)) == len(keys)


def test_make_key_separator_cannot_be_forged_by_a_field():
    assert shards.make_key("d", "p__x1", "2") != shards.make_key("d", "p", "1__2")
    assert shards.make_key("a__b", "c", "1.2") != shards.make_key("a", "b__c", "1.2")


def test_make_key_refuses_empty_fields():
    with pytest.raises(shards.ContractError, match="participant_id"):
        shards.make_key("topcon_triton", "", "1.2")


# ---------------------------------------------------------------------------------------------- index
def _index(tmp_path):
    index, _ = make_shard_set(str(tmp_path / "set"), per_device=2, devices=("topcon_triton",))
    return index


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda ix: ix.update(format_version=99), "format_version"),
        (lambda ix: ix.pop("splits"), "'splits'"),
        (lambda ix: ix.pop("counts"), "'counts'"),
        (lambda ix: ix["splits"].update(holdout=ix["splits"]["train"]), "'holdout'"),
        (lambda ix: ix["splits"]["train"]["shards"][0].pop("sha256"), "'sha256'"),
        (lambda ix: ix["splits"]["train"].update(num_samples=ix["splits"]["train"]["num_samples"] + 1), "'train'"),
    ],
)
def test_validate_index_refuses_naming_the_set_and_field(tmp_path, mutate, expected):
    index = copy.deepcopy(_index(tmp_path))
    shards.validate_index(index, where="SET-X")
    mutate(index)
    with pytest.raises(shards.ContractError) as info:
        shards.validate_index(index, where="SET-X")
    assert "SET-X" in str(info.value) and expected in str(info.value)


def test_read_index_refuses_a_directory_without_index(tmp_path):
    root = tmp_path / "set"
    _index(tmp_path)
    assert shards.read_index(str(root))["counts"]["by_split"]
    (root / shards.INDEX_NAME).unlink()
    with pytest.raises(shards.ContractError, match="no index.json"):
        shards.read_index(str(root))
    with pytest.raises(shards.ContractError, match="no index.json"):
        shards.read_index(str(tmp_path / "never-written"))


def test_decode_sample_header_checks_metadata_against_the_npy_header_and_member_size():
    volume, meta = _sample()
    record = shards.encode_sample(volume, meta)
    data = record["npy"]
    got, offset, check = shards.decode_sample_header(record, data[:4096], len(data))
    assert got == meta and data[offset:] == volume.tobytes()
    check.verify(volume)
    with pytest.raises(shards.ContractError, match=f"{meta['key']}.*holds {len(data) - 1} bytes"):
        shards.decode_sample_header(record, data[:4096], len(data) - 1)
    wide = shards.encode_sample(volume.astype(np.uint16), {**meta, "dtype": "uint16"})["npy"]
    with pytest.raises(shards.ContractError, match="field 'dtype' says uint8, volume is uint16"):
        shards.decode_sample_header(record, wide[:4096], len(wide))
    with pytest.raises(shards.ContractError, match="field 'key'"):
        shards.decode_sample_header({**record, "__key__": "other"}, data[:4096], len(data))


# ---------------------------------------------------------------------------------------------- checksums
def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_every_record_carries_the_crc32c_of_its_members_and_decode_checks_them():
    volume, meta = _sample()
    record = shards.encode_sample(volume, meta)
    assert set(record) == {"__key__", *shards.MEMBER_EXTS}
    crcs = shards.read_checksums(record)
    assert crcs == {"json": google_crc32c.value(record["json"]), "npy": google_crc32c.value(record["npy"])}
    metadata_digit = record["json"].replace(b'"intensity_mean":127.5', b'"intensity_mean":128.5')
    assert json.loads(metadata_digit) == {**meta, "intensity_mean": 128.5}  # one digit, still valid metadata
    voxel = len(record["npy"]) - 1
    for damaged, member in (
        (dict(record, json=metadata_digit), "json"),
        (dict(record, npy=_flip(record["npy"], voxel)), "npy"),
    ):
        with pytest.raises(shards.ContractError, match=f"{meta['key']}: member '{member}' fails its CRC32C check"):
            shards.decode_sample(damaged)


def test_a_record_without_valid_checksums_is_refused_naming_the_member():
    volume, meta = _sample()
    record = shards.encode_sample(volume, meta)
    without = {k: v for k, v in record.items() if k != shards.CHECKSUM_EXT}
    with pytest.raises(shards.ContractError, match=f"{meta['key']}: member 'crc32c' is missing.*re-run"):
        shards.decode_sample(without)
    for bad in (b"{}", b'{"json": "zz", "npy": "00"}', b"not json", b'{"json": "1", "npy": "2", "x": "3"}'):
        with pytest.raises(shards.ContractError, match="member 'crc32c' is damaged"):
            shards.decode_sample(dict(record, crc32c=bad))
    with pytest.raises(shards.ContractError, match=f"{meta['key']}.*without member.*crc32c"):
        shards.write_shard(io.BytesIO(), [without])


def test_voxels_read_into_place_are_checked_against_the_stored_crc():
    volume, meta = _sample(dtype=np.uint16)
    record = shards.encode_sample(volume, meta)
    _, offset, check = shards.decode_sample_header(record, record["npy"][:4096], len(record["npy"]))
    slot = np.zeros((2, *volume.shape), dtype=volume.dtype)[1]  # a batch slot: a view into a larger buffer
    slot[...] = volume
    check.verify(slot)
    slot[1, 2, 3] ^= 1
    with pytest.raises(shards.ContractError, match=f"{meta['key']}: member 'npy' fails its CRC32C check"):
        check.verify(slot)


def test_crc32c_checks_any_buffer_in_place_with_googles_c_implementation():
    assert checksum.IMPLEMENTATION == "c" and checksum._EXTEND is not None  # no copy per volume
    array = np.random.default_rng(0).integers(0, 2**16, size=(3, 4, 5), dtype=np.uint16)
    for buffer in (array, array[1], bytearray(array.tobytes()), memoryview(array.tobytes())):
        assert checksum.crc32c(buffer) == google_crc32c.value(bytes(memoryview(buffer).cast("B")))
    assert checksum.crc32c(b"world", checksum.crc32c(b"hello ")) == google_crc32c.value(b"hello world")
    with pytest.raises(ValueError, match="C-contiguous"):
        checksum.crc32c(array[:, ::2])


def test_a_set_of_the_previous_format_version_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "set"
    index = _index(tmp_path)
    (root / shards.INDEX_NAME).write_bytes(shards.encode_index({**index, "format_version": 1}))
    with pytest.raises(
        shards.ContractError,
        match=r"format_version' is 1, this code reads 2.*re-run `octjepa "
        r"preprocess`",
    ):
        shards.read_index(str(root))
