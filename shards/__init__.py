"""The writer<->reader contract for preprocessed OCT shards (see ``contract`` and ``shardset``)."""
from shards.contract import (
    ALLOWED_DTYPES,
    FORMAT_VERSION,
    META_EXT,
    META_FIELDS,
    SPLITS,
    VOLUME_EXT,
    ContractError,
    decode_sample,
    encode_sample,
    make_key,
    validate_meta,
    validate_sample,
)
from shards.shardset import (
    ERRORS_NAME,
    INDEX_NAME,
    TAR_MTIME,
    TARGET_SHARD_BYTES,
    build_index,
    encode_index,
    iter_shard,
    read_index,
    sha256_of,
    shard_name,
    shard_urls,
    stable_hash,
    validate_index,
    write_index,
    write_shard,
    write_shard_file,
    remove_stale_shards,
)

__all__ = [
    "ALLOWED_DTYPES", "FORMAT_VERSION", "META_EXT", "META_FIELDS", "SPLITS", "VOLUME_EXT", "ContractError",
    "decode_sample", "encode_sample", "make_key", "validate_meta", "validate_sample",
    "ERRORS_NAME", "INDEX_NAME", "TAR_MTIME", "TARGET_SHARD_BYTES", "build_index", "encode_index", "iter_shard", "read_index",
    "sha256_of", "shard_name", "shard_urls", "stable_hash", "validate_index", "write_index", "write_shard", "write_shard_file", "remove_stale_shards",
]
