"""The sample contract: what one preprocessed OCT volume is, on disk and in memory.

A sample is a WebDataset record of three members: ``<key>.npy`` (the volume), ``<key>.json`` (its metadata) and
``<key>.crc32c`` (the CRC32C of each of the other two members' bytes, as JSON: ``{"json": "1a2b3c4d", "npy":
"..."}``, 8 lowercase hex digits each). ``encode_sample`` writes the checksums, so every writer (preprocess;
reshard copies the three members' bytes) carries them, and every reader checks them: the ``.json`` member before
its metadata is trusted, the ``.npy`` member over the bytes actually read (the loader checks the voxels in the
batch slot it read them into). CRC32C, not sha256: hardware-accelerated, it checks a volume at memory speed, so the
loader can afford it on every sample; ``index.json`` keeps a sha256 per shard for ``octjepa verify``. Format version
2 added the checksums; readers refuse version 1 sets (re-run preprocess).

Both the Beam writer and the trainer's reader import this module; nobody restates a member name or a dtype.
Volumes are C-order ``(D, H, W)`` = (B-scan, row = axial depth, column = lateral), stored at the source bit depth.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shards.checksum import crc32c
from shards.errors import OctjepaError

FORMAT_VERSION = 2  # 2: every sample carries a CRC32C member
VOLUME_EXT = "npy"
META_EXT = "json"
CHECKSUM_EXT = "crc32c"
# A sample's members in the order they are written: the checksums first, so a streaming reader has them before
# the bytes they check.
MEMBER_EXTS = (CHECKSUM_EXT, META_EXT, VOLUME_EXT)
CHECKED_EXTS = (META_EXT, VOLUME_EXT)
ALLOWED_DTYPES = ("uint8", "uint16")
SPLITS = ("train", "val", "test")

# Metadata fields every sample carries, with the Python type each must have.
META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "key": str,
    "participant_id": str,
    "device": str,
    "laterality": str,
    "anatomic_region": str,
    "sop_instance_uid": str,
    "source_path": str,
    "source_shape": list,
    "source_spacing_mm": list,
    "target_spacing_mm": list,
    "shape": list,
    "dtype": str,
    "fill_fraction": (int, float),
    "crop_offsets": list,
    "intensity_mean": (int, float),
    "intensity_std": (int, float),
    "split": str,
}

_SAFE = re.compile(r"[A-Za-z0-9_-]")
KEY_SEPARATOR = "_-_"


class ContractError(OctjepaError, ValueError):
    """A sample or shard set that does not meet the contract; the message names the field and the key."""

    exit_code = 1


def _escape(text: str) -> str:
    # Injective escaping into [A-Za-z0-9_-]: '-' is the escape character itself, so it is escaped too.
    out = []
    for ch in text:
        if ch == "-" or not _SAFE.fullmatch(ch):
            out.append("-" + "".join(f"{b:02x}" for b in ch.encode("utf-8")) + "-")
        else:
            out.append(ch)
    return "".join(out)


def make_key(device: str, participant_id: str, sop_instance_uid: str) -> str:
    """The one place sample keys are built: dot-free (WebDataset splits member names at the first dot) and unique.

    UIDs are digits and dots, so dots become ``-`` there (still injective); other fields are escaped.
    """
    for name, value in (("device", device), ("participant_id", participant_id), ("sop_instance_uid", sop_instance_uid)):
        if not value:
            raise ContractError(f"make_key: {name} is empty (device={device!r}, participant={participant_id!r})")
    uid = (
        sop_instance_uid.replace(".", "-")
        if re.fullmatch(r"[0-9.]+", sop_instance_uid)
        else "x" + _escape(sop_instance_uid)
    )
    # "_-_" never occurs inside an escaped field: an escape is "-<hex>-", so '-' is never between two '_'.
    return f"{_escape(device)}{KEY_SEPARATOR}{_escape(participant_id)}{KEY_SEPARATOR}{uid}"


def encode_volume(volume: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(volume), allow_pickle=False)
    return buf.getvalue()


def parse_npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data offset)`` from the first bytes of a ``.npy`` member (its header is
    short: the loader reads a few KiB, then the voxels straight into a batch). Raises ValueError."""
    return _parse_npy_header(bytes(head[: _npy_header_length(head)]))


def _npy_header_length(head: bytes) -> int:
    """Bytes of the magic, version, length field and header dict, from the length field (NPY format 1.0 / 2.0)."""
    if head[:6] == b"\x93NUMPY" and len(head) >= 12:
        if head[6] == 1:
            return 10 + int.from_bytes(head[8:10], "little")
        if head[6] == 2:
            return 12 + int.from_bytes(head[8:12], "little")
    return len(head)  # not a header numpy writes: numpy's reader says what is wrong


@functools.lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    # Cached: a set's volumes share a few headers, and numpy parses each with ast.literal_eval (a compile per call).
    buf = io.BytesIO(header)
    version = np.lib.format.read_magic(buf)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not volumes")
    return tuple(shape), dtype, fortran_order, buf.tell()


def decode_volume(data: bytes) -> np.ndarray:
    """The ``.npy`` member as a read-only array viewing ``data`` (no copy: the loader's batch stacking copies once)."""
    shape, dtype, fortran_order, offset = parse_npy_header(data)
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"truncated .npy: header says {shape} {dtype}, {len(data) - offset} data bytes")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def validate_meta(meta: Mapping[str, Any]) -> None:
    key = meta.get("key", "<no key>")
    for name, kind in META_FIELDS.items():
        if name not in meta:
            raise ContractError(f"sample {key}: missing metadata field {name!r}")
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ContractError(
                f"sample {key}: field {name!r} should be {kind}, found {type(value).__name__} {value!r}"
            )
    if meta["format_version"] != FORMAT_VERSION:
        raise format_version_error(f"sample {key}: field 'format_version'", meta["format_version"])
    if meta["dtype"] not in ALLOWED_DTYPES:
        raise ContractError(f"sample {key}: field 'dtype' is {meta['dtype']!r}, expected one of {ALLOWED_DTYPES}")
    for name in ("shape", "source_shape", "source_spacing_mm", "target_spacing_mm", "crop_offsets"):
        if len(meta[name]) != 3:
            raise ContractError(f"sample {key}: field {name!r} should have 3 entries (D, H, W), found {meta[name]!r}")
    if not 0.0 <= meta["fill_fraction"] <= 1.0:
        raise ContractError(f"sample {key}: field 'fill_fraction' {meta['fill_fraction']} is outside [0, 1]")
    if meta["split"] not in SPLITS:
        raise ContractError(f"sample {key}: field 'split' is {meta['split']!r}, expected one of {SPLITS}")


def format_version_error(where: str, found: Any) -> ContractError:
    """The one message for data written in another shard format: what was found, what this code reads, what to do."""
    advice = ""
    if isinstance(found, int) and found < FORMAT_VERSION:
        advice = (
            "; it predates per-sample CRC32C checksums: re-run `octjepa preprocess` (then `octjepa reshard`) "
            "to rewrite the set"
        )
    return ContractError(f"{where} is {found!r}, this code reads {FORMAT_VERSION}{advice}")


def validate_sample(volume: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Reject a sample whose volume disagrees with its metadata or the contract, naming the field and the key."""
    validate_meta(meta)
    check_layout(meta, volume.shape, volume.dtype)


def check_layout(meta: Mapping[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Reject a volume shape/dtype (e.g. from a ``.npy`` header alone) that disagrees with validated metadata."""
    key = meta["key"]
    if str(dtype) != meta["dtype"]:
        raise ContractError(f"sample {key}: field 'dtype' says {meta['dtype']}, volume is {dtype}")
    if len(shape) != 3 or list(shape) != list(meta["shape"]):
        raise ContractError(f"sample {key}: field 'shape' says {meta['shape']}, volume is {list(shape)}")


def encode_checksums(members: Mapping[str, Any]) -> bytes:
    """The ``.crc32c`` member of a record whose ``.json`` and ``.npy`` members' bytes are in ``members``."""
    return encode_meta({ext: f"{crc32c(members[ext]):08x}" for ext in CHECKED_EXTS})


def read_checksums(sample: Mapping[str, Any]) -> dict[str, int]:
    """``{"json": crc, "npy": crc}`` from a record's ``.crc32c`` member; ContractError naming the key if it is
    missing or malformed (a malformed one is damage too: its sample cannot be checked, so it is not trusted)."""
    key = sample.get("__key__", "<no key>")
    if CHECKSUM_EXT not in sample:
        raise ContractError(
            f"sample {key}: member {CHECKSUM_EXT!r} is missing (members: {sorted(sample)}); a set "
            f"written before format version 2 has none: re-run `octjepa preprocess`"
        )
    try:
        stored = json.loads(sample[CHECKSUM_EXT])
        crcs = {ext: int(stored[ext], 16) for ext in CHECKED_EXTS}
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ContractError(f"sample {key}: member {CHECKSUM_EXT!r} is damaged ({type(exc).__name__}: {exc})") from exc
    if sorted(stored) != sorted(CHECKED_EXTS) or any(not 0 <= c < 2**32 for c in crcs.values()):
        raise ContractError(f"sample {key}: member {CHECKSUM_EXT!r} is damaged: {sample[CHECKSUM_EXT][:80]!r}")
    return crcs


def check_crc(key: str, ext: str, stored: int, found: int) -> None:
    if stored != found:
        raise ContractError(
            f"sample {key}: member {ext!r} fails its CRC32C check (stored {stored:08x}, read "
            f"{found:08x}): its bytes changed after they were written"
        )


@dataclass(frozen=True)
class VolumeCheck:
    """The check of a volume whose voxels are read straight into place: the ``.npy`` member's stored CRC32C and the
    CRC32C of its header bytes (the member's bytes before the voxels), to be continued over the voxels read."""

    key: str
    stored: int
    header_crc: int

    def verify(self, voxels: np.ndarray) -> None:
        """Raise ContractError unless ``voxels`` (C-contiguous, as read from the member) complete the stored CRC."""
        self.verify_running(crc32c(voxels, self.header_crc))

    def verify_running(self, crc: int) -> None:
        """Raise ContractError unless ``crc``, ``header_crc`` continued over the voxels as they were read (see
        ``MemberReader.readinto``), is the stored CRC."""
        check_crc(self.key, VOLUME_EXT, self.stored, crc)


def encode_sample(volume: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Volume + metadata -> a WebDataset record ``{"__key__": key, "npy": bytes, "json": bytes, "crc32c": bytes}``."""
    validate_sample(volume, meta)
    record = {"__key__": meta["key"], VOLUME_EXT: encode_volume(volume), META_EXT: encode_meta(meta)}
    record[CHECKSUM_EXT] = encode_checksums(record)
    return record


def _check_meta_member(sample: Mapping[str, Any], crcs: Mapping[str, int]) -> None:
    key = sample.get("__key__", "<no key>")
    if META_EXT not in sample:
        raise ContractError(f"sample {key}: member {META_EXT!r} is missing (members: {sorted(sample)})")
    check_crc(key, META_EXT, crcs[META_EXT], crc32c(sample[META_EXT]))


def decode_sample_header(
    sample: Mapping[str, Any], head: bytes, volume_size: int
) -> tuple[dict[str, Any], int, VolumeCheck]:
    """Validate a record before its voxels are read: ``sample`` holds the ``.json`` and ``.crc32c`` members' bytes,
    ``head`` the first bytes of the ``.npy`` member (a few KiB hold its header) and ``volume_size`` that member's
    size. Returns ``(meta, data offset, check)``: the C-order voxels of ``meta["shape"]``/``meta["dtype"]`` are the
    member's bytes from the offset to its end, and ``check.verify(voxels)`` checks them once read."""
    key = sample.get("__key__", "<no key>")
    crcs = read_checksums(sample)
    _check_meta_member(sample, crcs)
    try:
        meta = json.loads(sample[META_EXT])
        shape, dtype, fortran_order, offset = parse_npy_header(head)
    except (ValueError, UnicodeDecodeError, EOFError) as exc:
        raise ContractError(f"sample {key}: undecodable member: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise ContractError(f"sample {key}: field 'key' says {meta.get('key') if isinstance(meta, dict) else meta!r}")
    validate_meta(meta)
    check_layout(meta, shape, dtype)
    if fortran_order and len(shape) > 1 and math.prod(shape[1:]) > 1:
        raise ContractError(f"sample {key}: the .npy member is Fortran-ordered; volumes are stored C-order")
    expected = offset + math.prod(shape) * dtype.itemsize
    if volume_size != expected:
        raise ContractError(f"sample {key}: the .npy member holds {volume_size} bytes, its header says {expected}")
    return meta, offset, VolumeCheck(key, crcs[VOLUME_EXT], crc32c(bytes(head[:offset])))


def decode_sample(sample: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A WebDataset record (member bytes keyed by extension) -> validated ``(volume (D, H, W), meta)``, both members
    checked against their stored CRC32C first."""
    key = sample.get("__key__", "<no key>")
    crcs = read_checksums(sample)
    _check_meta_member(sample, crcs)
    if VOLUME_EXT not in sample:
        raise ContractError(f"sample {key}: member {VOLUME_EXT!r} is missing (members: {sorted(sample)})")
    check_crc(key, VOLUME_EXT, crcs[VOLUME_EXT], crc32c(sample[VOLUME_EXT]))
    try:
        meta = json.loads(sample[META_EXT])
        volume = decode_volume(sample[VOLUME_EXT])
    except (ValueError, UnicodeDecodeError, EOFError) as exc:
        raise ContractError(f"sample {key}: undecodable member: {exc}") from exc
    if meta.get("key") != key:
        raise ContractError(f"sample {key}: field 'key' says {meta.get('key')!r}")
    validate_sample(volume, meta)
    return volume, meta
