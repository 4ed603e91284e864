"""Checkpoints of a run (local directory or gs://) and the encoder export for downstream use.

Layout under the checkpoint root:

    step-000001000/state.pt      everything needed to continue (see `CheckpointStore.save`)
    step-000001000/config.yaml   the resolved config, readable without torch
    latest                       name of the newest complete checkpoint, written only after it is complete

Atomicity. Locally a checkpoint is written under `.tmp-<name>-<uuid>/` and renamed into place, so a `step-*`
directory exists only once complete. GCS has no rename, but each object appears only when its upload finishes;
the `latest` object is written after every file of the checkpoint, so a run killed mid-save leaves `latest` on
the previous, complete checkpoint. Resume reads `latest`; without it (e.g. older runs) it falls back to the
newest complete checkpoint found by listing.

    from trainer.checkpoint import load_encoder
    encoder, enc_cfg = load_encoder("runs/smoke/encoder.pt")   # or a checkpoint directory
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
import uuid
from typing import Any

import torch
import yaml

from model import EncoderConfig, VisionTransformer3D
from shards import storage
from shards.errors import OctjepaError
from shards.typed_config import from_dict, to_dict

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "octjepa-checkpoint-v1"
ENCODER_FORMAT = "octjepa-encoder-v1"
STATE_NAME = "state.pt"
CONFIG_NAME = "config.yaml"
LATEST_NAME = "latest"


class CheckpointNotFound(OctjepaError, FileNotFoundError):
    """No complete checkpoint or encoder export where one was named."""

    exit_code = 1


_STEP_DIR = re.compile(r"^step-(\d{9})$")
# Test hook: "<step>:<marker path>" makes the save of that step write its files, touch the marker and stall
# before publishing, so a test can SIGKILL a process that is provably mid-save.
PAUSE_ENV = "OCTJEPA_TEST_CHECKPOINT_PAUSE"


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_torch(url: str) -> dict:
    # weights_only: a checkpoint holds tensors, numbers, strings and containers only; nothing is unpickled as code.
    with storage.open_url(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _maybe_pause(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec and int(spec.split(":", 1)[0]) == step:
        with open(spec.split(":", 1)[1], "w") as f:
            f.write("saving\n")
        time.sleep(600)


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

    def save(self, step: int, state: dict, config: dict) -> str:
        """Write `state` (all tensors on the CPU) and the resolved config as the checkpoint of `step`, publish
        it as `latest`, prune to the newest `keep_last`; returns its URL."""
        name = step_dir_name(step)
        # state.pt last: on GCS its presence then means every other file is there too.
        files = {CONFIG_NAME: yaml.safe_dump(config, sort_keys=False).encode(),
                 STATE_NAME: _torch_bytes({"format": CHECKPOINT_FORMAT, **state})}
        if self.remote:
            for fname, data in files.items():
                storage.write_bytes(storage.join(self.root, name, fname), data)
            _maybe_pause(step)
        else:
            self._save_local(name, files, step)
        storage.write_bytes(self.url(LATEST_NAME), name.encode())
        self.prune()
        return self.url(name)

    def _save_local(self, name: str, files: dict[str, bytes], step: int) -> None:
        os.makedirs(self.root, exist_ok=True)
        for stale in os.listdir(self.root):  # leftovers of a process killed mid-save; never published
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
        tmp = os.path.join(self.root, f".tmp-{name}-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        for fname, data in files.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _maybe_pause(step)
        final = os.path.join(self.root, name)
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
        for step in steps[:-self.keep_last]:
            storage.remove(self.url(step_dir_name(step)), recursive=True)
        if self.remote and steps:
            fs, path = storage.get_fs(self.root)
            for entry in fs.ls(path, detail=False):
                m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
                if m and int(m.group(1)) < steps[-1] and int(m.group(1)) not in steps:
                    storage.remove(self.url(m.group(0)), recursive=True)


def load_checkpoint(url: str) -> dict:
    """The state dict saved in checkpoint directory `url` (or its state.pt), checked for its format."""
    state_url = url if url.endswith(STATE_NAME) else storage.join(url, STATE_NAME)
    if not storage.exists(state_url):
        raise CheckpointNotFound(f"{url}: no {STATE_NAME}; not a complete checkpoint")
    state = _load_torch(state_url)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_url}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


def resolve_resume(resume: str, store: CheckpointStore) -> str | None:
    """"" -> None (fresh run); "auto" -> the latest complete checkpoint or None; anything else -> that path."""
    if not resume:
        return None
    if resume == "auto":
        return store.latest()
    return resume


# ---- one encoder (target or online), alone, for downstream use ---------------------------------------------------

ENCODER_KINDS = ("target", "online")  # the EMA target encoder, or the online (context) encoder it follows


def export_encoder(path: str, model: torch.nn.Module, cfg: Any) -> None:
    """Write the encoder ``cfg.checkpoint.export_encoder`` names with its config: {"format", "encoder",
    "encoder_config", "state_dict", "train_config"}."""
    which = cfg.checkpoint.export_encoder
    module = model.encoder if which == "online" else model.target_encoder
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload = {"format": ENCODER_FORMAT, "encoder": which, "encoder_config": to_dict(cfg.model.encoder),
               "state_dict": state, "train_config": to_dict(cfg)}
    storage.write_bytes(path, _torch_bytes(payload))


def _encoder_from(state_dict: dict, encoder_config: dict, where: str) -> tuple[VisionTransformer3D, EncoderConfig]:
    enc_cfg = from_dict(EncoderConfig, encoder_config, where=f"{where}: encoder_config")
    encoder = VisionTransformer3D(enc_cfg)
    encoder.load_state_dict(state_dict)
    return encoder.eval(), enc_cfg


def _from_checkpoint(state: dict, which: str | None, where: str) -> tuple[VisionTransformer3D, EncoderConfig]:
    # A checkpoint holds both; without a choice, the one its run exports (runs before the key: the target).
    which = which or state["config"].get("checkpoint", {}).get("export_encoder", "target")
    key = "encoder" if which == "online" else "target_encoder"
    return _encoder_from(state[key], state["config"]["model"]["encoder"], where)


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
        return _from_checkpoint(load_checkpoint(path), which, path)
    payload = _load_torch(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == ENCODER_FORMAT:
        held = payload.get("encoder", "target")  # exports before the choice existed held the target
        if which is not None and which != held:
            raise CheckpointNotFound(f"{path}: this export holds the {held} encoder, not the {which} one; "
                                     "load the run's checkpoint to choose")
        return _encoder_from(payload["state_dict"], payload["encoder_config"], path)
    if fmt == CHECKPOINT_FORMAT:
        return _from_checkpoint(payload, which, path)
    raise ValueError(f"{path}: format {fmt!r}; expected {ENCODER_FORMAT!r} or {CHECKPOINT_FORMAT!r}")
