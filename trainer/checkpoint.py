"""Checkpoints of a run (local directory or gs://) and the encoder export for downstream use.

Layout under the checkpoint root:

    step-000001000/dcp/           model and optimiser state: torch.distributed.checkpoint, written by every rank
                                  (FSDP2 / XLA fsdp: each its shards; replicated: deduplicated), keyed by parameter
                                  name, so it loads under any sharding and any number of ranks or hosts
    step-000001000/rng-00000.pt   each rank's (host's) RNG states
    step-000001000/config.yaml    the resolved config, readable without torch
    step-000001000/state.pt       step, epoch, schedules, config: written last (the checkpoint is complete)
    latest                        name of the newest complete checkpoint, written only after it is complete

Checkpoints of format v1 (`state.pt` holding every tensor, written by one process) still load.

Atomicity. Locally a checkpoint is written under `.tmp-step-<n>/` and renamed into place, so a `step-*`
directory exists only once complete. GCS has no rename, but each object appears only when its upload finishes;
`state.pt` is written after every other file of the checkpoint and `latest` after that, so a run killed mid-save
leaves `latest` on the previous, complete checkpoint. Resume reads `latest`; without it (e.g. older runs) it falls
back to the newest complete checkpoint found by listing; a checkpoint that cannot be read is skipped for the one
before it (see `trainer.train_state`).

    from trainer.checkpoint import load_encoder
    encoder, enc_cfg = load_encoder("runs/smoke/encoder.pt")   # or a checkpoint directory
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
import warnings
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

from model import EncoderConfig, VisionTransformer3D
from shards import storage
from shards.errors import OctjepaError
from shards.typed_config import from_dict, to_dict

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "octjepa-checkpoint-v2"
LEGACY_FORMAT = "octjepa-checkpoint-v1"  # every tensor inside state.pt
ENCODER_FORMAT = "octjepa-encoder-v1"
STATE_NAME = "state.pt"
CONFIG_NAME = "config.yaml"
LATEST_NAME = "latest"
DCP_DIR = "dcp"
# DCP's note that a save or load without a process group is one process's: that is what it is meant to be here.
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class CheckpointNotFound(OctjepaError, FileNotFoundError):
    """No complete checkpoint or encoder export where one was named."""

    exit_code = 1


class CheckpointUnreadable(CheckpointNotFound):
    """A checkpoint that is there but cannot be read back (truncated, overwritten, not a torch file)."""


_STEP_DIR = re.compile(r"^step-(\d{9})$")
# What torch.load raises on a cut or garbled file: EOFError (empty), RuntimeError (no zip central directory),
# ValueError (a seek past a cut end), UnpicklingError (garbled pickle).
_UNREADABLE = (EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def rng_name(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch(url: str) -> Any:
    """A torch file (tensors, numbers, strings, containers only); CheckpointUnreadable when cut or garbled."""
    # weights_only: a checkpoint holds tensors, numbers, strings and containers only; nothing is unpickled as code.
    with storage.open_url(url, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        raise CheckpointUnreadable(
            f"{url} ({len(data)} bytes) cannot be read: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'empty'}"
        ) from exc


class CheckpointStore:
    """Save, list, prune and load the checkpoints under one root (a local directory or a gs:// URL)."""

    def __init__(self, root: str, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = root.rstrip("/") if storage.is_remote(root) else root
        self.keep_last = keep_last
        self.remote = storage.is_remote(root)

    def url(self, name: str) -> str:
        return storage.join(self.root, name)

    def begin(self, step: int) -> str:
        """Prepare the place every rank writes the checkpoint of `step` into (call once, on the main rank):
        locally a fresh `.tmp-step-<n>` directory (leftovers of killed saves removed), on GCS the step's own
        prefix, emptied of a save of the same step that an earlier run left (it is rewritten, not mixed)."""
        name = step_dir_name(step)
        if self.remote:
            where = self.url(name)
            if storage.exists(where):
                storage.remove(where, recursive=True)
            return where
        os.makedirs(self.root, exist_ok=True)
        for stale in os.listdir(self.root):  # leftovers of a process killed mid-save; never published
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
        tmp = os.path.join(self.root, f".tmp-{name}")
        os.makedirs(tmp)
        return tmp

    def commit(self, step: int, where: str, state: dict, config: dict) -> str:
        """Finish the checkpoint `begin` prepared, once every rank wrote its part into `where`: write the config
        and `state` (state.pt, last), publish it (rename locally), point `latest` at it, prune; returns its URL."""
        name = step_dir_name(step)
        files = {
            CONFIG_NAME: yaml.safe_dump(config, sort_keys=False).encode(),
            STATE_NAME: torch_bytes({"format": CHECKPOINT_FORMAT, **state}),
        }
        for fname, data in files.items():  # state.pt last: on GCS its presence means every other file is there
            if self.remote:
                storage.write_bytes(storage.join(where, fname), data)
            else:
                with open(os.path.join(where, fname), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        if not self.remote:
            self._publish_local(where, os.path.join(self.root, name))
        storage.write_bytes(self.url(LATEST_NAME), name.encode())
        self.prune()
        return self.url(name)

    def save(self, step: int, state: dict, config: dict) -> str:
        """A checkpoint made of `state` and the config alone (one process); returns its URL."""
        return self.commit(step, self.begin(step), state, config)

    def _publish_local(self, tmp: str, final: str) -> None:
        """Rename a fully written checkpoint directory into place: the moment it becomes complete."""
        if os.path.exists(final):  # the same step saved again after a resume from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)

    def steps(self) -> list[int]:
        """Steps of the checkpoints that are complete (locally: renamed into place; on GCS: state.pt present)."""
        fs, path = storage.get_fs(self.root)
        if not fs.exists(path):
            return []
        if self.remote:
            fs.invalidate_cache()
        found = []
        for entry in fs.ls(path, detail=False):
            m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m and fs.exists(f"{entry.rstrip('/')}/{STATE_NAME}"):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> str | None:
        """URL of the newest complete checkpoint: the one `latest` names, else the newest listed; None if none."""
        pointer = self.url(LATEST_NAME)
        if storage.exists(pointer):
            name = storage.read_bytes(pointer).decode().strip()
            if not _STEP_DIR.match(name):
                raise ValueError(f"{pointer}: expected a checkpoint name like step-000000100, found {name!r}")
            if storage.exists(storage.join(self.root, name, STATE_NAME)):
                return self.url(name)
            log.warning("%s names %s, which has no %s; falling back to listing", pointer, name, STATE_NAME)
        steps = self.steps()
        return self.url(step_dir_name(steps[-1])) if steps else None

    def prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints, and on GCS the remains of saves killed
        before they completed (step directories without state.pt, older than the newest complete one)."""
        steps = self.steps()
        for step in steps[: -self.keep_last]:
            storage.remove(self.url(step_dir_name(step)), recursive=True)
        if self.remote and steps:
            fs, path = storage.get_fs(self.root)
            for entry in fs.ls(path, detail=False):
                m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
                if m and int(m.group(1)) < steps[-1] and int(m.group(1)) not in steps:
                    storage.remove(self.url(m.group(0)), recursive=True)


def checkpoint_dir(url: str) -> str:
    """The checkpoint directory of `url` (the directory itself or its state.pt)."""
    if url.rstrip("/").endswith("/" + STATE_NAME) or url == STATE_NAME:
        return url.rstrip("/")[: -len(STATE_NAME) - 1]
    return url.rstrip("/") if storage.is_remote(url) else url


def load_checkpoint(url: str) -> dict:
    """The state saved in checkpoint directory `url` (or its state.pt), checked for its format (v2: counters,
    schedules and config, the tensors being in `dcp/`; v1: every tensor too)."""
    state_url = storage.join(checkpoint_dir(url), STATE_NAME)
    if not storage.exists(state_url):
        raise CheckpointNotFound(f"{url}: no {STATE_NAME}; not a complete checkpoint")
    state = load_torch(state_url)
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt not in (CHECKPOINT_FORMAT, LEGACY_FORMAT):
        raise CheckpointUnreadable(f"{state_url}: format {fmt!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


class _StorageFileSystem(FileSystem):
    """DCP's fsspec adapter on the filesystem `shards.storage` configures (retries; the emulator's endpoint in
    tests), so checkpoints go through the same client as every other object."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.fs = storage.get_fs(url)[0]

    def init_path(self, path: Any, **kwargs: Any) -> Any:
        return path

    def rename(self, path: Any, new_path: Any) -> None:
        # GCS has no rename: copy, then delete (what gcsfs falls back to after trying its move API, which some
        # endpoints refuse only after its retries). Completeness is state.pt, written after, not this rename.
        self.fs.copy(str(path), str(new_path))
        self.fs.rm(str(path))


def dcp_writer(url: str) -> FileSystemWriter:
    """A torch.distributed.checkpoint writer for a local directory or a gs:// prefix."""
    return _on_storage_fs(FsspecWriter, url) if storage.is_remote(url) else FileSystemWriter(url)


def dcp_reader(url: str) -> FileSystemReader:
    return _on_storage_fs(FsspecReader, url) if storage.is_remote(url) else FileSystemReader(url)


def _on_storage_fs(cls: type, url: str) -> Any:
    io_ = cls(url, **storage.get_fs(url)[0].storage_options)  # options as storage's, so no other client is set up
    io_.fs = _StorageFileSystem(url)
    return io_


def load_dcp(url: str, state: dict, *, planner: Any = None, process_group: Any = None, no_dist: bool = False) -> None:
    """Load checkpoint `url`'s DCP tensors into `state` in place (names as saved, e.g. {"model": {...}})."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        dcp.load(
            state,
            storage_reader=dcp_reader(storage.join(checkpoint_dir(url), DCP_DIR)),
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )


def resume_candidates(resume: str, store: CheckpointStore) -> list[str]:
    """Checkpoints to try, in order: "" -> none (fresh run); "auto" -> every complete one, the one `latest`
    names first, then the others newest first (the fallbacks when it cannot be read); a path -> that path."""
    if not resume:
        return []
    if resume != "auto":
        return [resume]
    latest = store.latest()
    if latest is None:
        return []
    older = [store.url(step_dir_name(s)) for s in reversed(store.steps())]
    return [latest] + [u for u in older if u != latest]


# ---- one encoder (target or online), alone, for downstream use ---------------------------------------------------

ENCODER_KINDS = ("target", "online")  # the EMA target encoder, or the online (context) encoder it follows


def encoder_state(model: torch.nn.Module, which: str = "target") -> dict[str, torch.Tensor]:
    """The state dict of the target (EMA) or online encoder as whole, plain CPU tensors (copies). Under FSDP2 its
    shards are gathered, a collective: every rank calls it. On XLA the sharded tensors come back whole."""
    module = model.encoder if which == "online" else model.target_encoder
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", copy=True)
        for k, v in module.state_dict().items()
    }


def export_encoder(path: str, model: torch.nn.Module, cfg: Any, *, write: bool = True) -> None:
    """Write the encoder ``cfg.checkpoint.export_encoder`` names with its config: {"format", "encoder",
    "encoder_config", "state_dict", "train_config"}, a plain state dict loadable without torch.distributed
    (`load_encoder`). With several ranks call it on every rank (FSDP2 gathers the shards) and `write` on one."""
    which = cfg.checkpoint.export_encoder
    state = encoder_state(model, which)
    if not write:
        return
    payload = {
        "format": ENCODER_FORMAT,
        "encoder": which,
        "encoder_config": to_dict(cfg.model.encoder),
        "state_dict": state,
        "train_config": to_dict(cfg),
    }
    storage.write_bytes(path, torch_bytes(payload))


def _encoder_from(state_dict: dict, encoder_config: dict, where: str) -> tuple[VisionTransformer3D, EncoderConfig]:
    enc_cfg = from_dict(EncoderConfig, encoder_config, where=f"{where}: encoder_config")
    encoder = VisionTransformer3D(enc_cfg)
    encoder.load_state_dict(state_dict)
    return encoder.eval(), enc_cfg


def load_encoder(path: str, which: str | None = None) -> tuple[VisionTransformer3D, EncoderConfig]:
    """An encoder (eval mode, CPU) and its config, from an `export_encoder` file, a checkpoint directory, its
    state.pt, or a checkpoint root (its latest checkpoint). ``which`` ("target" or "online") picks one of a
    checkpoint's two encoders (default: the one its config exports); an export holds one, and refuses the other."""
    if which is not None and which not in ENCODER_KINDS:
        raise ValueError(f"encoder kind must be one of {ENCODER_KINDS}, got {which!r}")
    fs, fpath = storage.get_fs(path)
    if not fs.exists(fpath):
        raise CheckpointNotFound(f"{path}: no such encoder export or checkpoint")
    if fs.isdir(fpath):
        if not storage.exists(storage.join(path, STATE_NAME)):
            latest = CheckpointStore(path).latest()
            if latest is None:
                raise CheckpointNotFound(f"{path}: a directory with neither {STATE_NAME} nor any checkpoint")
            path = latest
        return _checkpoint_encoder(path, load_checkpoint(path), which)
    payload = load_torch(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == ENCODER_FORMAT:
        held = payload.get("encoder", "target")  # exports before the choice existed held the target
        if which is not None and which != held:
            raise CheckpointNotFound(
                f"{path}: this export holds the {held} encoder, not the {which} one; "
                "load the run's checkpoint to choose"
            )
        return _encoder_from(payload["state_dict"], payload["encoder_config"], path)
    if fmt in (CHECKPOINT_FORMAT, LEGACY_FORMAT):
        return _checkpoint_encoder(path, payload, which)
    raise ValueError(f"{path}: format {fmt!r}; expected {ENCODER_FORMAT!r} or {CHECKPOINT_FORMAT!r}")


def _checkpoint_encoder(url: str, state: dict, which: str | None) -> tuple[VisionTransformer3D, EncoderConfig]:
    # A checkpoint holds both encoders; without a choice, the one its run exports (runs before the key: the target).
    which = which or state["config"].get("checkpoint", {}).get("export_encoder", "target")
    prefix = "encoder" if which == "online" else "target_encoder"
    enc_config = state["config"]["model"]["encoder"]
    if state["format"] == LEGACY_FORMAT:
        return _encoder_from(state[prefix], enc_config, url)
    # Only that encoder's tensors are read, in this process alone, whatever sharding wrote them.
    template = VisionTransformer3D(from_dict(EncoderConfig, enc_config, where=f"{url}: encoder_config")).state_dict()
    wanted = {"model": {f"{prefix}.{k}": v for k, v in template.items()}}
    load_dcp(url, wanted, no_dist=True)
    return _encoder_from({k[len(prefix) + 1 :]: v for k, v in wanted["model"].items()}, enc_config, url)
