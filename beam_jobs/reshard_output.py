"""Where ``octjepa reshard`` may write, without Beam: checks made before anything under ``--output`` is deleted, and
the removal of domain folders an earlier run left there.

    check_output(output, overwrite=False)      # under the output's lease, before the earlier indexes are retracted
    remove_stale_domains(output, {"topcon_triton"})   # at the end, before the root index.json

``check_output`` refuses an output that holds a complete set it did not write (an index.json at the top or one
level down whose ``created_by`` is not this job), and a complete earlier re-sharded root unless ``--overwrite``
(``shards.lease.require_overwrite``). That ``--output`` is apart from ``--input`` is checked first, by
``shards.lease.check_separate``.

``remove_stale_domains`` removes, from every folder under the output that is not a domain of this run (a domain of
an earlier ``--by`` or ``--domains``), the files a reshard run writes there (shard files and their temporaries in
split folders, errors.jsonl, index.json) and then the folder itself when nothing else is left. A folder that also
holds anything else keeps that, and is logged: nothing of a domain set is left half-there, nothing foreign deleted.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Iterable
from typing import Any

from beam_jobs.reshard_files import CREATED_BY
from shards import ERRORS_NAME, INDEX_NAME, SPLITS, is_root_index, remove_stale_shards, storage
from shards.lease import require_overwrite
from shards.typed_config import ConfigError

_LOG = logging.getLogger(__name__)


def check_output(output: str, *, overwrite: bool) -> None:
    """Refuse to write into ``output`` when that would replace a set this job did not write, or a complete earlier
    result without ``--overwrite``."""
    fs, root = storage.get_fs(output)
    fs.invalidate_cache()
    top = posixpath.join(root, INDEX_NAME)
    if fs.exists(top) and not is_root_index(_read(fs, top)):
        raise ConfigError(f"--output {output} holds a shard set, not a re-sharded root; choose another folder")
    foreign = [
        posixpath.dirname(path)
        for path in sorted(fs.glob(posixpath.join(root, "*", INDEX_NAME)))
        if _read(fs, path).get("created_by") != CREATED_BY
    ]
    if foreign:
        raise ConfigError(
            f"--output {output} holds shard set(s) not written by octjepa reshard "
            f"({', '.join(posixpath.basename(p) for p in foreign)}); re-sharding there would delete "
            f"their index.json. Choose another folder"
        )
    require_overwrite(output, overwrite)


def _read(fs: Any, path: str) -> dict[str, Any]:
    try:
        value = json.loads(fs.cat_file(path))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def remove_stale_domains(output: str, keep: Iterable[str]) -> list[str]:
    """Remove the domain folders (names as ``domain_dir`` gives them) under ``output`` that are not in ``keep``;
    returns the names of the folders removed."""
    fs, root = storage.get_fs(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    keep, removed = set(keep), []
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry["type"] != "directory" or name in keep:
            continue
        folder = storage.join(output, name)
        remove_stale_shards(folder, set())
        for leftover in (ERRORS_NAME, INDEX_NAME):
            storage.remove(storage.join(folder, leftover))
        if _remove_empty_folders(output, name):
            removed.append(name)
        else:
            _LOG.warning("%s: not a domain of this run, and holds files reshard does not write; those are left", folder)
    if removed:
        _LOG.info("%s: removed the domain folder(s) of an earlier run: %s", output, ", ".join(removed))
    return removed


def _remove_empty_folders(output: str, name: str) -> bool:
    """Remove the domain folder's split folders and itself where empty; True when nothing of it is left. On GCS a
    folder is only a name prefix: it is gone with its last object."""
    if storage.is_remote(output):
        fs, path = storage.get_fs(storage.join(output, name))
        fs.invalidate_cache()
        return not fs.exists(path)
    folder = os.path.join(output, name)
    for split in SPLITS:
        path = os.path.join(folder, split)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    if os.listdir(folder):
        return False
    os.rmdir(folder)
    return True
