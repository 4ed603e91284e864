"""Records altered on purpose, for the checksum and verify tests (valid sets come from ``shards.synthetic``).

from tests.shards.helpers import rewritten
"""

from __future__ import annotations

from typing import Any

import shards


def rewritten(record: dict[str, Any], **members: bytes) -> dict[str, Any]:
    """``record`` with ``members`` replaced and its checksums made to match, as a writer would have written it (a
    record changed without new checksums is damage, which is what the checksum tests make)."""
    out = {**record, **members}
    out[shards.CHECKSUM_EXT] = shards.contract.encode_checksums(out)
    return out
