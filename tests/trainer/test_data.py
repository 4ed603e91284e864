"""Behaviour of the streaming loader: equal steps on every host, skipped samples, balancing, val, eval, gs://."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import octjepa_cli
import shards
from model.config import MaskConfig
from model.masks import MultiBlockMasks
from shards import storage, verify
from shards.typed_config import ConfigError, from_dict
from tests.shards.helpers import rewritten
from tests.trainer.shardset_fixture import make_shard_set
from trainer import augment, stages
from trainer.data import (
    DataConfig,
    DataDamageError,
    build_train_loader,
    build_val_loader,
    iter_eval_batches,
    split_shards,
    steps_per_epoch,
    to_model_input,
)
from trainer.host_split import Shard, epoch_order, host_shards, worker_quota

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
CROP = (4, 16, 16)
MASKS = MultiBlockMasks((2, 2, 2), MaskConfig())  # the grid of CROP with (2, 8, 8) patches
UNEVEN = [9, 1, 1, 5, 2, 6, 1]  # 25 train samples in shards of very different sizes


def _cfg(root: str, **kw) -> DataConfig:
    return DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=4, num_workers=0, **kw)


def _train(
    cfg: DataConfig, index: dict, *, host: int = 0, hosts: int = 1, epoch: int = 0, batch: int = 2, seed: int = 0
) -> list[dict]:
    return list(
        build_train_loader(
            cfg, index=index, batch_size=batch, masks=MASKS, seed=seed, epoch=epoch, host_index=host, host_count=hosts
        )
    )


def _number(key: str) -> int:
    """Fake sample number from its key (participant id = 1000 + number; see the fixture)."""
    return int(key.split(shards.contract.KEY_SEPARATOR)[1]) - 1000


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("uneven") / "set")
    return root, make_shard_set(root, n_train=sum(UNEVEN), n_val=7, samples_per_shard=UNEVEN, val_samples_per_shard=3)


# ---- host split ------------------------------------------------------------------------------------------------


def test_epoch_order_depends_only_on_seed_and_epoch():
    shards_ = [Shard(f"s{i}", i + 1, 0) for i in range(20)]
    assert epoch_order(shards_, seed=3, epoch=1) == epoch_order(list(shards_), seed=3, epoch=1)
    assert epoch_order(shards_, seed=3, epoch=1) != epoch_order(shards_, seed=3, epoch=2)
    assert sorted(epoch_order(shards_, seed=3, epoch=1), key=lambda s: s.url) == sorted(shards_, key=lambda s: s.url)


def test_host_slices_partition_the_shards_then_top_up_short_hosts():
    ordered = epoch_order([Shard(f"s{i}", n, 0) for i, n in enumerate(UNEVEN)], seed=0, epoch=0)
    plain = [host_shards(ordered, host_index=h, host_count=3, min_samples=0, seed=0, epoch=0) for h in range(3)]
    assert sorted(s.url for part in plain for s in part) == sorted(s.url for s in ordered)
    assert len({sum(s.num_samples for s in part) for part in plain}) > 1  # the hosts really are unequal
    for h in range(3):
        mine = host_shards(ordered, host_index=h, host_count=3, min_samples=8, seed=0, epoch=0)
        assert mine[: len(plain[h])] == plain[h] and sum(s.num_samples for s in mine) >= 8
    assert [worker_quota(7, worker=w, num_workers=3) for w in range(3)] == [3, 2, 2]


# ---- training stream -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hosts", [3, 9])  # 9 hosts > 7 shards: some hosts own no shard at all
def test_every_host_runs_exactly_steps_per_epoch_batches(uneven, hosts):
    root, index = uneven
    cfg = _cfg(root)
    steps = steps_per_epoch(index, cfg, 2 * hosts)
    assert steps == max(1, sum(UNEVEN) // (2 * hosts))
    for epoch in (0, 1):
        for host in range(hosts):
            batches = _train(cfg, index, host=host, hosts=hosts, epoch=epoch)
            assert len(batches) == steps
            for b in batches:
                assert b["volume"].shape == (2, 1, *CROP) and b["volume"].dtype == torch.uint8
                assert b["scale"].shape == b["shift"].shape == (2,) and len(b["keys"]) == 2
                assert [tuple(m.shape) for pair in b["masks"] for m in pair] == [
                    (2, k) for kc, kt in zip(MASKS.num_context, MASKS.num_target) for k in (kc, kt)
                ]


def test_worker_processes_together_yield_exactly_steps_batches(uneven):
    root, index = uneven
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=4, num_workers=2)
    loader = build_train_loader(
        cfg, index=index, batch_size=3, masks=MASKS, seed=0, epoch=0, host_index=1, host_count=2
    )
    batches = list(loader)
    assert len(batches) == len(loader) == steps_per_epoch(index, cfg, 6) == 4
    assert all(b["volume"].shape == (3, 1, *CROP) for b in batches)


def test_same_seed_same_stream_and_each_epoch_reshuffles(uneven):
    root, index = uneven
    cfg = _cfg(root)
    a, b = _train(cfg, index, seed=5), _train(cfg, index, seed=5)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["volume"], y["volume"]) and torch.equal(x["scale"], y["scale"]) for x, y in zip(a, b))
    assert all(torch.equal(mx[1], my[1]) for x, y in zip(a, b) for mx, my in zip(x["masks"], y["masks"]))
    assert [x["keys"] for x in a] != [x["keys"] for x in _train(cfg, index, seed=5, epoch=1)]


def test_batches_are_random_crops_of_the_stored_samples(uneven):
    root, index = uneven
    batches = _train(_cfg(root, intensity_jitter=0.0), index, batch=5)
    for b in batches:
        for key, vol, scale, shift in zip(b["keys"], b["volume"], b["scale"], b["shift"]):
            level = _number(key) % 200 + 20  # every voxel of the sample is in [level, level + 8)
            assert int(vol.min()) >= level and int(vol.max()) < level + 8
            # No jitter: scale/shift are the plain z-score, so the crop's mean lands near 0.
            assert abs(float(to_model_input(vol[None], scale[None], shift[None]).mean())) < 1.0
            assert float(scale) == pytest.approx(1 / float(np.std(np.arange(8))), rel=0.2)


def _stored_volumes(root: str, index: dict, split: str = "train") -> dict[str, np.ndarray]:
    out = {}
    for url in shards.shard_urls(root, index, split):
        with storage.open_url(url) as f:
            for sample in shards.iter_shard(f):
                volume, meta = shards.decode_sample(sample)
                out[meta["key"]] = volume
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_volumes_stored_at_the_crop_shape_reach_batches_byte_for_byte(tmp_path, workers):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=16, n_val=2, shape=CROP, samples_per_shard=[5, 3, 8])
    stored = _stored_volumes(root, index)
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=6, num_workers=workers)
    batches = _train(cfg, index, batch=3)
    assert len(batches) == steps_per_epoch(index, cfg, 3) == 5
    for b in batches:
        assert len(set(b["keys"])) == 3
        for key, vol in zip(b["keys"], b["volume"]):
            assert np.array_equal(vol[0].numpy(), stored[key])
    if workers:
        return
    # The open batches are the shuffle buffer: samples land at random slots of 2 open batches, so the stream is
    # reordered, but only within a window of about shuffle_buffer samples of the read order (shuffle_buffer=1).
    read_order = [
        k
        for b in _train(DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=1, num_workers=0), index, batch=3)
        for k in b["keys"]
    ]
    shuffled = [k for b in batches for k in b["keys"]]
    common = set(shuffled) & set(read_order)  # the epoch ends with some samples still in open batches
    assert shuffled != read_order and len(common) >= len(read_order) - 6
    assert max(abs(i - read_order.index(k)) for i, k in enumerate(shuffled) if k in common) < 2 * 6


def test_a_set_mixing_uint8_and_uint16_gives_batches_of_one_dtype_with_exact_voxels(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=24, n_val=2, shape=CROP, dtypes=("uint8", "uint16", "uint16"))
    stored = _stored_volumes(root, index)
    batches = _train(_cfg(root), index, batch=2)
    assert {b["volume"].dtype for b in batches} == {torch.uint8, torch.uint16}
    for b in batches:
        for key, vol in zip(b["keys"], b["volume"]):
            assert str(stored[key].dtype) == str(vol.numpy().dtype)
            assert np.array_equal(vol[0].numpy(), stored[key])


def test_flips_are_drawn_on_the_host_and_applied_by_to_model_input(uneven):
    root, index = uneven
    flips = torch.cat([b["flip"] for b in _train(_cfg(root), index, batch=5)])
    assert flips.dtype == torch.bool and 0 < int(flips.sum()) < len(flips)
    assert not any(b["flip"].any() for b in _train(_cfg(root, flip_lateral=False), index, batch=5))
    vol = torch.arange(2 * 2 * 3 * 4, dtype=torch.uint8).view(2, 1, 2, 3, 4)
    scale, shift = torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])
    x = to_model_input(vol, scale, shift, flip=torch.tensor([False, True]))
    assert torch.equal(x[0], vol[0].float() * 0.5 + 1.0)
    assert torch.equal(x[1], (vol[1].float() * 2.0 - 1.0).flip(-1))
    assert torch.equal(to_model_input(vol, scale, shift)[1], vol[1].float() * 2.0 - 1.0)


def test_undecodable_samples_are_skipped_counted_by_the_samples_lost_and_logged(tmp_path, caplog):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=12, n_val=2, samples_per_shard=4)
    first = storage.join(root, shards.shard_name("train", 0))
    with storage.open_url(first) as f:
        samples = list(shards.iter_shard(f))
    bad_key = samples[1]["__key__"]
    samples[1] = rewritten(samples[1], npy=b"not an npy array")  # checksummed, but not a volume
    with open(first, "wb") as f:
        shards.write_shard(f, samples)
    last = storage.join(root, shards.shard_name("train", 2))
    with storage.open_url(last) as f:
        kept = sum(1 for _ in shards.iter_shard(f)) // 2
    with open(last, "r+b") as f:  # a truncated upload: the reader keeps what it can, then moves on
        f.truncate(os.path.getsize(last) // 2)
    caplog.set_level(logging.WARNING, logger="trainer.stages")
    cfg = _cfg(root, max_skipped_fraction=0.5)
    batches = _train(cfg, index, batch=2)
    assert len(batches) == steps_per_epoch(index, cfg, 2) == 6
    assert bad_key not in {k for b in batches for k in b["keys"]}
    drops = [d for b in batches for d in b["dropped"]]
    # One bad sample, and the samples the half shard no longer holds (1 or 2 of its 4, depending on where the cut
    # fell), each pass over the shards; the count is what the batches say.
    assert sum(int(b["skipped"]) for b in batches) == sum(d.samples for d in drops) > 0
    assert {(d.shard, d.key) for d in drops if d.samples == 1 and "undecodable" in d.reason} == {(first, bad_key)}
    assert {d.samples for d in drops if d.shard == last} <= {4 - kept, 4 - kept + 1}
    assert bad_key in caplog.text and "shard-000002.tar" in caplog.text


def test_a_set_with_no_decodable_sample_raises_instead_of_hanging(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=4, n_val=2, samples_per_shard=4)
    path = storage.join(root, shards.shard_name("train", 0))
    with storage.open_url(path) as f:
        samples = [{**s, "json": b"{}"} for s in shards.iter_shard(f)]
    with open(path, "wb") as f:
        shards.write_shard(f, samples)
    with pytest.raises(DataDamageError, match="no decodable sample"):  # an OctjepaError: one line, exit code 1
        _train(_cfg(root, max_skipped_fraction=1.0), index)


# ---- damage: checksums, shards held to the index, the budget ------------------------------------------------


def _tar_members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _edit_member(path: str, name: str, change) -> None:
    """Rewrite member ``name`` of a shard in place, same length (the tar still parses; only a checksum can tell)."""
    (member,) = [m for m in _tar_members(path) if m.name == name]
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        old = f.read(member.size)
        new = change(old)
        assert len(new) == len(old) and new != old
        f.seek(member.offset_data)
        f.write(new)


def _flip_voxel(path: str, sample: int) -> str:
    """Flip one voxel bit of the ``sample``-th sample of a shard; returns its key."""
    key = [m.name for m in _tar_members(path)][3 * sample].split(".")[0]
    _edit_member(path, f"{key}.{shards.VOLUME_EXT}", lambda b: b[:-5] + bytes([b[-5] ^ 0x10]) + b[-4:])
    return key


def _change_meta_digit(path: str, sample: int) -> str:
    """Change the last digit of the ``sample``-th sample's stored intensity mean: valid JSON, valid metadata."""
    key = [m.name for m in _tar_members(path)][3 * sample].split(".")[0]

    def change(text: bytes) -> bytes:
        meta = json.loads(text)
        old = json.dumps(meta["intensity_mean"]).encode()
        new = old[:-1] + str((int(old[-1:]) + 1) % 10).encode()
        changed = text.replace(b'"intensity_mean":' + old, b'"intensity_mean":' + new)
        assert json.loads(changed)["intensity_mean"] != meta["intensity_mean"]
        return changed

    _edit_member(path, f"{key}.{shards.META_EXT}", change)
    return key


def _shard_path(root: str, number: int, split: str = "train") -> str:
    return storage.join(root, shards.shard_name(split, number))


def _drops(batches: list[dict]) -> list[stages.Drop]:
    return [d for b in batches for d in b["dropped"]]


def test_a_shard_truncated_on_a_member_boundary_counts_its_lost_samples_and_stops_the_run(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=16, n_val=2, shape=CROP, samples_per_shard=8)
    path = _shard_path(root, 0)
    members = _tar_members(path)
    lost = {m.name.split(".")[0] for m in members[15:]}
    end = members[14].offset_data + -(-members[14].size // 512) * 512  # right after the 5th sample's last member
    with open(path, "r+b") as f:
        f.truncate(end)
    with pytest.raises(DataDamageError, match=r"3 damaged sample\(s\) dropped.*shard-000000\.tar \(3\)"):
        _train(_cfg(root), index, batch=2)
    batches = _train(_cfg(root, max_skipped_fraction=0.25), index, batch=2)  # 3 of 16 are within 25%
    drops = _drops(batches)
    assert drops and {(d.shard, d.samples) for d in drops} == {(path, 3)}
    assert "ends after 5 of the 8 samples" in drops[0].reason and "bytes, its index says" in drops[0].reason
    assert sum(int(b["skipped"]) for b in batches) == 3 * len(drops)
    assert not lost & {k for b in batches for k in b["keys"]}


@pytest.mark.parametrize("stored", [CROP, (6, 20, 20)])  # read straight into its slot; read whole, then cropped
def test_a_flipped_voxel_byte_is_detected_and_the_sample_dropped_and_logged_with_shard_and_key(
    tmp_path, caplog, stored
):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=16, n_val=2, shape=stored, samples_per_shard=8)
    path = _shard_path(root, 1)
    key = _flip_voxel(path, 3)
    caplog.set_level(logging.WARNING, logger="trainer.stages")
    batches = _train(_cfg(root, max_skipped_fraction=0.1), index, batch=2)
    assert key not in {k for b in batches for k in b["keys"]}
    drops = _drops(batches)
    assert drops and {(d.shard, d.key, d.samples) for d in drops} == {(path, key, 1)}
    assert "member 'npy' fails its CRC32C check" in drops[0].reason
    assert f"shard {path}: dropped sample {key}: member 'npy' fails its CRC32C check" in caplog.text
    eval_keys = [k for b in iter_eval_batches(root, "train", CROP, 4, max_skipped_fraction=0.1) for k in b["keys"]]
    assert len(eval_keys) == 15 and key not in eval_keys


def test_a_changed_metadata_digit_is_detected_in_training_and_evaluation(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=12, n_val=4, shape=CROP, samples_per_shard=4)
    train_key = _change_meta_digit(_shard_path(root, 2), 1)
    val_key = _change_meta_digit(_shard_path(root, 0, "val"), 2)
    batches = _train(_cfg(root, max_skipped_fraction=0.1), index, batch=2)
    assert {(d.key, d.samples) for d in _drops(batches)} == {(train_key, 1)}
    assert "member 'json' fails its CRC32C check" in _drops(batches)[0].reason
    assert train_key not in {k for b in batches for k in b["keys"]}
    with pytest.raises(DataDamageError, match=r"split 'val'.*shard-000000\.tar \(1\)"):
        list(iter_eval_batches(root, "val", CROP, 2))  # the default budget: 1 of 4 is too many
    keys = [k for b in iter_eval_batches(root, "val", CROP, 2, max_skipped_fraction=0.5) for k in b["keys"]]
    assert len(keys) == 3 and val_key not in keys


def _set_shard_entry(root: str, index: dict, number: int, **fields) -> dict:
    """Rewrite index.json with shard ``number`` of train changed (split total kept consistent)."""
    index = json.loads(json.dumps(index))
    split = index["splits"]["train"]
    split["shards"][number].update(fields)
    split["num_samples"] = sum(s["num_samples"] for s in split["shards"])
    index["counts"]["by_split_device"]["train"] = {"a": split["num_samples"]}
    shards.write_index(root, index)
    return index


def _eval_drops(root: str, caplog) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Keys of every batch of the train split read for evaluation (every shard to its end, in index order), and the
    (shard, key, samples) of each drop the loader logged."""
    caplog.clear()
    keys = [k for b in iter_eval_batches(root, "train", CROP, 4, max_skipped_fraction=0.2) for k in b["keys"]]
    return keys, [r.args[:2] for r in caplog.records if r.msg.startswith("shard %s: dropped")]


def test_each_shard_is_held_to_its_sample_count_and_byte_size_in_the_index(tmp_path, caplog):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=12, n_val=2, shape=CROP, samples_per_shard=6, devices=("a",))
    first, second = _shard_path(root, 0), _shard_path(root, 1)
    entries = index["splits"]["train"]["shards"]
    caplog.set_level(logging.WARNING, logger="trainer.stages")
    # The index promises one sample more than the shard holds: that sample is lost, and counted.
    _set_shard_entry(root, index, 0, num_samples=7)
    keys, drops = _eval_drops(root, caplog)
    assert len(keys) == 12 and drops == [(first, "1 sample(s) after a_-_1005_-_1-2-826-0-1-1-5")]  # what is known
    assert "the shard ends after 6 of the 7 samples its index lists" in caplog.text
    # One sample fewer: the shard's last sample is not the index's, so it is dropped, not trained on.
    fewer = _set_shard_entry(root, index, 1, num_samples=5)
    extra = [m.name for m in _tar_members(second)][-1].split(".")[0]
    keys, drops = _eval_drops(root, caplog)
    assert len(keys) == 11 and extra not in keys and drops == [(second, f"sample {extra}")]
    assert "past the 5 samples the index lists" in caplog.text
    assert extra not in {k for b in _train(_cfg(root, max_skipped_fraction=0.2), fewer, batch=1) for k in b["keys"]}
    # Another byte size, every sample intact: reported; the samples are still checked one by one, and used.
    _set_shard_entry(root, index, 1, bytes=entries[1]["bytes"] + 512)
    keys, drops = _eval_drops(root, caplog)
    assert len(keys) == 12 and not drops
    size = entries[1]["bytes"]
    assert f"shard {second} holds {size} bytes, its index says {size + 512}" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_a_budget_of_zero_stops_at_the_first_damaged_sample(tmp_path, workers):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=24, n_val=2, shape=CROP, samples_per_shard=6)
    path = _shard_path(root, 2)
    _flip_voxel(path, 0)
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=4, num_workers=workers, max_skipped_fraction=0.0)
    loader = build_train_loader(
        cfg, index=index, batch_size=2, masks=MASKS, seed=0, epoch=0, host_index=0, host_count=1
    )
    seen = []
    with pytest.raises(DataDamageError, match=rf"1 damaged sample\(s\).*{path} \(1\)") as info:
        for batch in loader:
            seen.append(batch)
    assert "\n" not in str(info.value) and len(seen) < len(loader)
    assert not _drops(seen)  # the batch that carried the drop never left the loader
    # A budget above the damaged fraction (1 of 24) trains on: the drop is counted, and nothing stops.
    cfg.max_skipped_fraction = 0.05
    batches = _train(cfg, index, batch=2)
    assert len(batches) == 12 and {d.shard for d in _drops(batches)} == {path}
    assert sum(int(b["skipped"]) for b in batches) >= 1


def test_a_resumed_epoch_over_damaged_metadata_is_still_the_rest_of_the_uninterrupted_epoch(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=20, n_val=2, shape=CROP, samples_per_shard=[7, 5, 8])
    damaged = {_change_meta_digit(_shard_path(root, 0), 2), _change_meta_digit(_shard_path(root, 2), 5)}
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=6, num_workers=0, max_skipped_fraction=0.2)
    full = _train(cfg, index, batch=2, epoch=1)
    assert {d.key for d in _drops(full)} == damaged
    for start in (3, len(full) - 1):
        rest = list(
            build_train_loader(
                cfg, index=index, batch_size=2, masks=MASKS, seed=0, epoch=1, host_index=0, host_count=1, start=start
            )
        )
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]]
        assert all(torch.equal(a["volume"], b["volume"]) for a, b in zip(rest, full[start:]))


def test_train_stops_with_one_line_naming_the_shard_or_counts_the_drops_in_its_metrics(tmp_path, capsys, caplog):
    root = str(tmp_path / "set")
    make_shard_set(root, n_train=8, n_val=4, shape=(8, 32, 32), samples_per_shard=4)
    path = _shard_path(root, 1)
    key = _flip_voxel(path, 2)
    args = [
        "train",
        "--config",
        SMOKE,
        f"data.shards={root}",
        "model.encoder.input_shape=[8,32,32]",
        "data.crop_shape=[8,32,32]",
        "max_steps=2",
        "val_every=0",
        "logging.log_every=1",
        "checkpoint.every_steps=0",
        # A narrow model: the same code, less CPU.
        "model.encoder.embed_dim=48",
        "model.encoder.depth=2",
        "model.encoder.num_heads=2",
    ]
    assert octjepa_cli.main([*args, f"run_dir={tmp_path / 'stop'}", "data.max_skipped_fraction=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("octjepa train: training epoch") and f"{path} (1)" in err[-1]
    assert not (tmp_path / "stop" / "encoder.pt").exists()
    caplog.set_level(logging.WARNING, logger="trainer.stages")
    assert octjepa_cli.main([*args, f"run_dir={tmp_path / 'go'}", "data.max_skipped_fraction=0.2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "go" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in records if r["split"] == "train") == 1
    assert f"shard {path}: dropped sample {key}" in caplog.text


def test_a_resharded_set_keeps_valid_checksums_through_reshard_and_the_loader(tmp_path):
    from beam_jobs import reshard

    root, out = str(tmp_path / "set"), str(tmp_path / "by_device")
    make_shard_set(root, n_train=12, n_val=3, shape=CROP, samples_per_shard=5)
    stored = _stored_volumes(root, shards.read_index(root))
    reshard.run(
        [
            "--input",
            root,
            "--output",
            out,
            "--samples-per-shard",
            "2",
            "--direct_running_mode=in_memory",
            "--direct_num_workers=1",
        ]
    )
    assert verify.verify_shard_set(out).ok
    seen = set()
    for device in ("heidelberg_spectralis", "topcon_triton", "zeiss_cirrus"):
        domain = storage.join(out, device)
        batches = _train(_cfg(domain, max_skipped_fraction=0.0), shards.read_index(domain), batch=2)
        assert batches and not _drops(batches)
        for b in iter_eval_batches(domain, "train", CROP, 3, max_skipped_fraction=0.0):  # every sample, once
            for k, vol in zip(b["keys"], b["volume"]):
                assert np.array_equal(vol[0].numpy(), stored[k])
                seen.add(k)
    assert seen == set(stored)
    # A damaged source sample fails the copy, named, instead of being copied into a sound-looking set.
    key = _flip_voxel(_shard_path(root, 1), 0)
    with pytest.raises(shards.ContractError, match=f"{key}|shard-000001"):
        reshard.run(
            [
                "--input",
                root,
                "--output",
                str(tmp_path / "again"),
                "--direct_running_mode=in_memory",
                "--direct_num_workers=1",
            ]
        )


# ---- domain balancing ------------------------------------------------------------------------------------------


def _fraction_b(cfg: DataConfig, index: dict) -> float:
    keys = [k for b in _train(cfg, index, batch=4) for k in b["keys"]]
    return sum(k.startswith("b" + shards.contract.KEY_SEPARATOR) for k in keys) / len(keys)


def test_domain_weights_balance_a_dominant_device(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(
        root, n_train=120, n_val=2, shape=(4, 16, 16), devices=("a",) * 5 + ("b",), samples_per_shard=10
    )
    natural = _fraction_b(_cfg(root), index)
    balanced = _fraction_b(_cfg(root, domain_weights={"a": 1.0, "b": 1.0}), index)
    assert natural < 0.3 and 0.35 < balanced < 0.65, (natural, balanced)
    only_a = _fraction_b(_cfg(root, domain_weights={"a": 1.0, "b": 0.0}), index)
    assert only_a == 0.0
    with pytest.raises(ValueError, match=r"no weight for device\(s\) \['b'\]"):
        _train(_cfg(root, domain_weights={"a": 1.0}), index)
    with pytest.raises(ValueError, match="does not hold"):
        _train(_cfg(root, domain_weights={"a": 1.0, "b": 1.0, "zeiss_cirrus": 1.0}), index)


# ---- validation and evaluation ---------------------------------------------------------------------------------


def test_val_loader_is_identical_on_every_call_and_has_val_batches_on_every_host(uneven):
    root, index = uneven
    cfg = DataConfig(shards=root, crop_shape=CROP, num_workers=2, val_batches=3)
    seen = set()
    for host in range(3):
        first, again = (
            list(build_val_loader(cfg, index=index, batch_size=2, masks=MASKS, seed=1, host_index=host, host_count=3))
            for _ in range(2)
        )
        assert len(first) == len(again) == 3
        for x, y in zip(first, again):
            assert x["keys"] == y["keys"] and torch.equal(x["volume"], y["volume"])
            assert torch.equal(x["scale"], y["scale"]) and torch.equal(x["shift"], y["shift"])
            assert not x["flip"].any()  # no augmentation in validation
            assert all(torch.equal(a, b) for mx, my in zip(x["masks"], y["masks"]) for a, b in zip(mx, my))
            seen |= set(x["keys"])
    assert len(seen) == 7  # the hosts' slices together cover the val split


def test_eval_batches_cover_the_split_once_and_keep_the_partial_batch(uneven):
    root, index = uneven
    batches = list(iter_eval_batches(root, "val", CROP, 3))
    assert [len(b["keys"]) for b in batches] == [3, 3, 1]
    val_keys = set()
    for url in shards.shard_urls(root, index, "val"):
        with storage.open_url(url) as f:
            val_keys |= {x["__key__"] for x in shards.iter_shard(f)}
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(val_keys) == 7 and set(keys) == val_keys
    for b in batches:
        assert [m["key"] for m in b["meta"]] == b["keys"] and b["volume"].shape[1:] == (1, *CROP)
        expect = torch.tensor([1 / m["intensity_std"] for m in b["meta"]], dtype=torch.float32)
        assert torch.allclose(b["scale"], expect)
    with pytest.raises(shards.ContractError, match="no index.json"):
        list(iter_eval_batches(str(os.path.dirname(root)), "val", CROP, 3))


# ---- augmentation and config -----------------------------------------------------------------------------------


def test_crop_pads_short_axes_and_flip_mirrors_lateral():
    vol = np.arange(3 * 6 * 10, dtype=np.uint8).reshape(3, 6, 10)
    rng = np.random.default_rng(0)
    starts = augment.crop_starts(vol.shape, (4, 4, 4), rng)
    out = augment.crop_or_pad(vol, (4, 4, 4), starts)
    assert out.shape == (4, 4, 4) and starts[0] == 0
    h0, w0 = starts[1:]
    assert np.array_equal(out[:3], vol[:, h0 : h0 + 4, w0 : w0 + 4]) and not out[3].any()  # D: 3 -> 4, zero-padded
    assert augment.crop_starts(vol.shape, (2, 4, 4), None) == (0, 1, 3)  # centre crop
    assert np.array_equal(augment.flip_lateral(vol)[..., 0], vol[..., -1])
    scale, shift = augment.scale_shift(100.0, 20.0, 0.0, rng)
    assert (scale, shift) == (1 / 20.0, -5.0)
    for _ in range(20):
        scale, shift = augment.scale_shift(100.0, 20.0, 0.1, rng)
        a = scale * 20.0
        assert 0.9 <= a <= 1.1 and abs(shift + a * 5.0) <= 0.1


def test_data_config_is_closed_and_checked():
    cfg = from_dict(DataConfig, {"crop_shape": [8, 32, 32], "domain_weights": {"topcon_triton": 1}})
    assert cfg.crop_shape == (8, 32, 32) and cfg.domain_weights == {"topcon_triton": 1.0}
    with pytest.raises(ConfigError, match="shuffle_bufer"):
        from_dict(DataConfig, {"shuffle_bufer": 8})
    with pytest.raises(ConfigError, match="domain_weights"):
        from_dict(DataConfig, {"domain_weights": {"a": -1.0}})
    assert from_dict(DataConfig, {}).max_skipped_fraction == 0.001
    assert from_dict(DataConfig, {"max_skipped_fraction": 0}).max_skipped_fraction == 0.0
    with pytest.raises(ConfigError, match="max_skipped_fraction"):
        from_dict(DataConfig, {"max_skipped_fraction": 1.5})


# ---- gs:// -----------------------------------------------------------------------------------------------------


def test_train_loader_reads_gcs_in_worker_processes(gcs):
    root = f"{gcs}/set"
    make_shard_set(root, n_train=12, n_val=4, samples_per_shard=3)
    index = shards.read_index(root)  # the parent creates a gcsfs instance before the workers fork
    assert [s.url for s in split_shards(root, index, "train")][0].startswith("gs://")
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=4, num_workers=2)
    batches = list(
        build_train_loader(cfg, index=index, batch_size=2, masks=MASKS, seed=0, epoch=0, host_index=0, host_count=2)
    )
    assert len(batches) == 3 and all(b["volume"].shape == (2, 1, *CROP) for b in batches)


@pytest.mark.parametrize("workers, buffer", [(0, 12), (0, 7), (2, 9)])
def test_an_epoch_is_a_pass_every_sample_once_whatever_the_shuffle_buffer(tmp_path, workers, buffer):
    # 4 shards of 6: with 2 workers each reads 12 samples, 4 batches of 3; the open batches (up to 4 here) must not
    # leave samples of the pass waiting while samples of the next pass fill the epoch's last batches.
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=24, n_val=2, shape=CROP, samples_per_shard=6)
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=buffer, num_workers=workers)
    every = sorted(k for b in list(iter_eval_batches(root, "train", CROP, 8)) for k in b["keys"])
    for epoch in range(3):
        batches = _train(cfg, index, batch=3, epoch=epoch, seed=epoch)
        keys = [k for b in batches for k in b["keys"]]
        assert len(batches) == 8 and sorted(keys) == every, f"epoch {epoch}: {len(set(keys))} of 24 samples"
        assert [_number(k) for k in keys] != sorted(_number(k) for k in keys)  # still shuffled
        for b in batches:  # a packed slot moved its voxels with its key
            assert all(
                int(v.float().mean()) - 20 - _number(k) % 200 in range(8) for v, k in zip(b["volume"], b["keys"])
            )
    # Resuming at each batch of an epoch whose end was packed gives the same rest.
    full = _train(cfg, index, batch=3, epoch=0, seed=0)
    for start in range(1, 8):
        rest = list(
            build_train_loader(
                cfg, index=index, batch_size=3, masks=MASKS, seed=0, epoch=0, host_index=0, host_count=1, start=start
            )
        )
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]]
        assert all(torch.equal(a["volume"], b["volume"]) for a, b in zip(rest, full[start:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_yields_the_rest_of_the_uninterrupted_epoch_without_reading_the_skipped_batches(
    tmp_path, monkeypatch, workers
):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=30, n_val=2, shape=CROP, samples_per_shard=[7, 5, 9, 9])
    cfg = DataConfig(shards=root, crop_shape=CROP, shuffle_buffer=6, num_workers=workers)
    full = _train(cfg, index, batch=2, epoch=1)
    reads = []
    if not workers:  # count voxel reads in this process
        original = shards.MemberReader.readinto
        monkeypatch.setattr(
            shards.MemberReader,
            "readinto",
            lambda self, *a, **kw: (reads.append(self.name), original(self, *a, **kw))[1],
        )
    for start in (0, 5, len(full) - 1, len(full)):
        loader = build_train_loader(
            cfg, index=index, batch_size=2, masks=MASKS, seed=0, epoch=1, host_index=0, host_count=1, start=start
        )
        reads.clear()
        rest = list(loader)
        assert len(rest) == len(loader) == len(full) - start
        for a, b in zip(rest, full[start:]):
            assert (
                a["keys"] == b["keys"] and torch.equal(a["volume"], b["volume"]) and torch.equal(a["flip"], b["flip"])
            )
            assert all(torch.equal(x, y) for ma, mb in zip(a["masks"], b["masks"]) for x, y in zip(ma, mb))
        if not workers:  # the skipped batches' voxels are not read: at most the open batches' slots on top
            assert len(rest) * 2 <= len(reads) <= len(rest) * 2 + 6
    with pytest.raises(ValueError, match="outside the epoch"):
        build_train_loader(
            cfg,
            index=index,
            batch_size=2,
            masks=MASKS,
            seed=0,
            epoch=1,
            host_index=0,
            host_count=1,
            start=len(full) + 1,
        )
