"""A small, valid shard set written straight through the contract (no Beam, no DICOM): the source set of
``benchmarks/reshard.py`` and of the shard-set tests.

    from shards.synthetic import make_shard_set
    index, samples = make_shard_set("bench/source", per_device=8, shape=(64, 384, 384))

Samples are random uint8 volumes spread over several devices, both eyes, two anatomic regions and all three splits
(split is per participant, as in preprocessing).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from shards.contract import FORMAT_VERSION, META_EXT, encode_sample, make_key
from shards.index import complete_set
from shards.shardset import write_shard_file

CREATED_BY = "shards.synthetic"
DEVICES = ("heidelberg_spectralis", "topcon_maestro2", "topcon_triton", "zeiss_cirrus")
# Participant number modulo 5 -> split: 3/5 train, 1/5 val, 1/5 test (so even 3 participants cover every split).
_SPLIT_OF = ("train", "val", "test", "train", "train")


def fake_meta(
    device: str, participant: int, eye: str, shape: Sequence[int], split: str, *, uid: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Valid contract metadata for participant ``1000 + participant``'s ``eye`` scan; ``fields`` override any
    field but the ones derived from the UID (``key``, ``source_path``)."""
    participant_id = str(1000 + participant)
    if uid is None:
        uid = f"1.2.826.0.1.3680043.{participant}.{ord(eye)}.{DEVICES.index(device) if device in DEVICES else 9}"
    return {
        "format_version": FORMAT_VERSION,
        "key": make_key(device, participant_id, uid),
        "participant_id": participant_id,
        "device": device,
        "laterality": eye,
        "anatomic_region": "macula" if participant % 2 == 0 else "optic_disc",
        "sop_instance_uid": uid,
        "source_path": f"retinal_oct/structural_oct/{device}/{participant_id}/{uid}.dcm",
        "source_shape": list(shape),
        "source_spacing_mm": [0.1, 0.004, 0.012],
        "target_spacing_mm": [0.1, 0.004, 0.012],
        "shape": list(shape),
        "dtype": "uint8",
        "fill_fraction": 1.0,
        "crop_offsets": [0, 0, 0],
        "intensity_mean": 127.5,
        "intensity_std": 73.9,
        "split": split,
        **fields,
    }


def make_shard_set(
    root: str,
    *,
    devices: tuple[str, ...] = DEVICES,
    per_device: int = 6,
    shape: tuple[int, int, int] = (4, 8, 8),
    samples_per_shard: int = 3,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write a complete shard set at ``root``; returns ``(index, samples)`` with ``samples[key]`` the encoded record
    (``__key__``, ``npy`` and ``json`` bytes) exactly as written. ``per_device`` samples per device come from
    ``per_device // 2`` participants with both eyes (plus one single-eye participant when it is odd)."""
    rng = np.random.default_rng(seed)
    by_split: dict[str, list[dict[str, Any]]] = {}
    samples: dict[str, dict[str, Any]] = {}
    for d, device in enumerate(devices):
        for i in range(per_device):
            participant = d * 1000 + i // 2  # 1000 is a multiple of 5: every device starts at 'train'
            split = _SPLIT_OF[participant % len(_SPLIT_OF)]
            meta = fake_meta(device, participant, "LR"[i % 2], shape, split)
            volume = rng.integers(0, 256, size=shape, dtype=np.uint8)
            record = encode_sample(volume, meta)
            samples[record["__key__"]] = record
            by_split.setdefault(split, []).append(record)
    chunked = {}
    for split, records in sorted(by_split.items()):
        records.sort(key=lambda r: r["__key__"])
        chunked[split] = [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]
    index = write_set(
        root,
        chunked,
        config={"made_by": CREATED_BY, "samples_per_shard": samples_per_shard, "seed": seed},
        created_by=CREATED_BY,
    )
    return index, samples


def write_set(
    root: str, shards_by_split: dict[str, list[list[dict[str, Any]]]], *, config: dict[str, Any], created_by: str
) -> dict[str, Any]:
    """Write encoded records as a complete shard set: ``shards_by_split[split][n]`` is shard n's records, in order;
    then an empty errors.jsonl and index.json, last. Returns the index."""
    entries, by_split_device = [], {}
    for split, shard_records in shards_by_split.items():
        for n, records in enumerate(shard_records):
            entries.append(write_shard_file(root, split, n, records))
            for record in records:
                device = json.loads(record[META_EXT])["device"]
                by_split_device.setdefault(split, {}).setdefault(device, 0)
                by_split_device[split][device] += 1
    total = sum(len(records) for shard_records in shards_by_split.values() for records in shard_records)
    return complete_set(
        root,
        entries,
        errors=b"",
        config=config,
        by_split_device=by_split_device,
        errors_by_reason={},
        manifest_rows=total,
        selected=total,
        created_by=created_by,
    )
