"""The trainer end to end on a tiny fake shard set (CPU): outputs of a smoke run, resume equivalence after a
process killed mid-checkpoint, and checkpoints on gs:// (the local GCS emulator)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from shards import storage
from shards.typed_config import from_dict
from tests.trainer.shardset_fixture import NARROW_TINY, SMALL_PREDICTOR, make_shard_set, train_args
from trainer.checkpoint import CheckpointStore, load_checkpoint, load_encoder
from trainer.config import TrainConfig
from trainer.train import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "set")
    make_shard_set(root, n_train=24, n_val=8, shape=(8, 32, 32))
    return root


def _args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return train_args(shards, run_dir, *NARROW_TINY, *extra)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_writes_every_output(
    shard_set: str, tmp_path: Path, gcs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_SILENT", "true")
    ckpt_dir = f"{gcs}/runs/smoke/checkpoints"
    assert (
        main(
            _args(
                shard_set,
                run_dir,
                "max_steps=6",
                "val_every=3",
                "checkpoint.every_steps=2",
                "checkpoint.keep_last=2",
                f"checkpoint.dir={ckpt_dir}",
                "logging.log_every=2",
                "logging.wandb=offline",
            )
        )
        == 0
    )

    # The resolved config: loadable as a TrainConfig, with the overrides in it.
    saved = from_dict(TrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.max_steps == 6 and saved.model.encoder.input_shape == (8, 32, 32) and saved.checkpoint.dir == ckpt_dir
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert (resolved["device"], resolved["attn_impl"], resolved["hosts"], resolved["total_steps"]) == (
        "cpu",
        "sdpa",
        1,
        6,
    )

    records = _records(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        for key in ("loss", "pred_std", "target_std", "grad_norm", "lr", "weight_decay", "momentum", "samples_per_s"):
            assert isinstance(r[key], float) and torch.isfinite(torch.tensor(r[key])), (key, r)
        assert r["skipped"] == 0
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]

    # Checkpoints on gs://: every 2 steps, the last 2 kept, `latest` on the final one, the config beside it.
    store = CheckpointStore(ckpt_dir, keep_last=2)
    assert store.steps() == [4, 6] and store.latest() == f"{ckpt_dir}/step-000000006"
    state = load_checkpoint(store.latest())
    assert (state["step"], state["epoch"], state["step_in_epoch"], state["seed"]) == (6, 1, 0, 0)
    assert set(state) >= {"schedules", "config", "host_count", "sharding"} and state["host_count"] == 1
    assert state["schedules"]["total_steps"] == 6
    for name in ("dcp/.metadata", "rng-00000.pt", "config.yaml"):
        assert storage.exists(f"{store.latest()}/{name}"), name

    # The exported target encoder equals the checkpoint's and is ready for downstream use.
    encoder, enc_cfg = load_encoder(str(run_dir / "encoder.pt"))
    assert not encoder.training and enc_cfg.input_shape == (8, 32, 32)
    from_ckpt, _ = load_encoder(ckpt_dir)  # a checkpoint root works too (its latest checkpoint)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, from_ckpt.state_dict()[name]), name
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(x), from_ckpt(x))

    for png in ("loss_curve.png", "masks_step000000000.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # W&B offline: a local run file holding the scalars and the mask image, no network needed.
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    for key in (b"train/loss", b"train/grad_norm", b"train/pred_std", b"val/loss", b"masks"):
        assert key in data, key


# The real trainer in a fresh process (`_args` narrows the model). Every run of the equivalence test is a fresh
# process with MKL's conditional numerical reproducibility on: MKL's CPU kernels may otherwise round differently
# with the memory alignment of their buffers, which depends on whatever ran earlier in the process.
TRAIN_SCRIPT = """
import sys
from trainer.train import main
sys.exit(main(sys.argv[1:]))
"""
TRAIN_ENV = {"PYTHONPATH": str(REPO), "MKL_CBWR": "COMPATIBLE"}
# The same, with the publishing of one checkpoint stalled after its files are written: the script touches the
# marker file (first argument) and sleeps, so the test can SIGKILL a process that is provably mid-save.
PAUSED_SAVE_SCRIPT = (
    """
import sys, time
import trainer.checkpoint
_publish = trainer.checkpoint.CheckpointStore._publish_local
marker, stall = sys.argv.pop(1), sys.argv.pop(1)
def stalled_publish(self, tmp, final):
    if final.endswith(stall):
        open(marker, "w").write("saving")
        time.sleep(600)
    return _publish(self, tmp, final)
trainer.checkpoint.CheckpointStore._publish_local = stalled_publish
"""
    + TRAIN_SCRIPT
)


def _train_process(args: list[str], script: str = TRAIN_SCRIPT) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def checkpoint_tensors(url: str | Path, scratch: Path) -> dict:
    """Every tensor of a local checkpoint: {"model": {name: tensor}, "optim": {"state": {name: {...}}, ...}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"tensors-{abs(hash(str(url)))}.pt"
    dcp_to_torch_save(str(Path(url) / "dcp"), str(out))
    return torch.load(out, weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    """Model and optimiser tensors of two checkpoints are bit-identical."""
    assert sorted(a["model"]) == sorted(b["model"])
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"{name} differs"
    for name, st in a["optim"]["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optim"]["state"][name][key])), (name, key)


def test_resume_after_a_kill_mid_checkpoint_matches_an_uninterrupted_run(shard_set: str, tmp_path: Path) -> None:
    # 8 steps of 2 micro-batches over 6 steps/epoch: the checkpoint at step 4 is mid-epoch, the run crosses an
    # epoch, drop path draws from the RNG, and two loader workers feed it.
    common = [
        "max_steps=8",
        "grad_accum=2",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=3",
        "model.encoder.drop_path=0.2",
        "data.num_workers=2",
        "val_every=0",
        "logging.log_every=1",
        "logging.mask_images=false",
        *SMALL_PREDICTOR,
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _train_process(_args(shard_set, straight, *common))

    # Stalls inside the step-8 save (files written, not yet published) so it can be SIGKILLed mid-save.
    marker = tmp_path / "saving-step-8"
    proc = _train_process([str(marker), "step-000000008", *_args(shard_set, killed, *common)], PAUSED_SAVE_SCRIPT)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached its step-8 checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _finish(reference)

    # Killed between writing step 8 and publishing it: step 4 is still the usable latest checkpoint.
    ckpts = killed / "checkpoints"
    assert (ckpts / ".tmp-step-000000008").is_dir(), "the kill should have caught a save in progress"
    store = CheckpointStore(str(ckpts))
    assert store.steps() == [4] and store.latest() == str(ckpts / "step-000000004")
    assert load_checkpoint(store.latest())["step"] == 4

    _finish(_train_process(_args(shard_set, killed, *common, "--resume", "auto")))
    assert not list(ckpts.glob(".tmp-*")) and store.steps() == [4, 8]
    a = load_checkpoint(str(straight / "checkpoints/step-000000008"))
    b = load_checkpoint(str(ckpts / "step-000000008"))
    assert (a["step"], a["epoch"], a["step_in_epoch"]) == (b["step"], b["epoch"], b["step_in_epoch"]) == (8, 1, 2)
    assert_same_tensors(
        checkpoint_tensors(straight / "checkpoints/step-000000008", tmp_path),
        checkpoint_tensors(ckpts / "step-000000008", tmp_path),
    )
    loss_a = {r["step"]: r["loss"] for r in _records(straight)}
    loss_b = {r["step"]: r["loss"] for r in _records(killed)}  # steps 5-8 logged twice: the rerun's count
    assert [loss_a[s] for s in range(5, 9)] == [loss_b[s] for s in range(5, 9)]


def test_a_partial_gcs_checkpoint_is_never_latest(gcs: str) -> None:
    """On GCS nothing is renamed: a save killed after some objects are written must not become `latest`."""
    store = CheckpointStore(f"{gcs}/ckpts", keep_last=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        store.save(step, {"step": step, "w": torch.full((2,), float(step))}, {"step": step})
    assert store.steps() == [2, 3]
    storage.write_bytes(f"{gcs}/ckpts/step-000000004/config.yaml", b"step: 4\n")  # killed before state.pt
    assert store.latest() == f"{gcs}/ckpts/step-000000003"
    assert torch.equal(load_checkpoint(store.latest())["w"], torch.full((2,), 3.0))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(f"{gcs}/ckpts/step-000000004")
    storage.remove(f"{gcs}/ckpts/latest")  # without the pointer, listing also skips the incomplete one
    assert store.latest() == f"{gcs}/ckpts/step-000000003"
    # Every file written but killed before `latest` moved: the pointer still names step 3.
    store.save(5, {"step": 5}, {"step": 5})
    assert not storage.exists(f"{gcs}/ckpts/step-000000004/config.yaml")  # the killed save's remains, pruned
    state5 = storage.read_bytes(f"{gcs}/ckpts/step-000000005/state.pt")
    storage.write_bytes(f"{gcs}/ckpts/step-000000006/state.pt", state5)
    assert store.latest() == f"{gcs}/ckpts/step-000000005"
