"""SIGTERM (a preempted VM, a scheduler's stop) in the middle of a run: the trainer finishes the step it is in,
writes a complete checkpoint at the step reached, exits 0, and `--resume auto` continues from there exactly.
(Under torchrun, with SIGTERM on one rank of two: tests/trainer/test_torchrun.py; on XLA: test_xla_pod.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.shardset_fixture import NARROW_TINY, SMALL_PREDICTOR, make_shard_set
from trainer.checkpoint import CheckpointStore, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
HARNESS = str(REPO / "tests/trainer/torchrun_harness.py")
SMOKE = str(REPO / "configs/smoke.yaml")
ENV = {"PYTHONPATH": str(REPO), "MKL_CBWR": "COMPATIBLE"}
ARGS = [
    "model.encoder.input_shape=[8,32,32]",
    "data.crop_shape=[8,32,32]",
    *SMALL_PREDICTOR,
    "global_batch_size=4",
    "val_every=0",
    "logging.log_every=1",
    "logging.mask_images=false",
    "max_steps=6",
    "checkpoint.every_steps=4",
    "data.num_workers=1",
    *NARROW_TINY,
]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "set")
    make_shard_set(root, n_train=24, n_val=8, shape=(8, 32, 32))
    return root


def _run(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, HARNESS, "train", "--config", SMOKE, *args],
        cwd=REPO,
        env={**os.environ, **ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def test_sigterm_mid_run_saves_the_step_reached_and_resume_continues(shard_set: str, tmp_path: Path) -> None:
    straight, stopped, marker = tmp_path / "straight", tmp_path / "stopped", tmp_path / "before-step-3"
    reference = _run([f"data.shards={shard_set}", f"run_dir={straight}", *ARGS])
    # The run pauses before step 3 (as if that step were long); SIGTERM arrives then.
    proc = _run([f"data.shards={shard_set}", f"run_dir={stopped}", *ARGS], HARNESS_STALL=f"2:0:3:{marker}")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    # To the whole process group, as a VM shutting down signals every process: the loader worker too.
    os.killpg(proc.pid, signal.SIGTERM)
    out = _finish(proc)
    assert "stopped by SIGTERM after step 3 of 6" in out
    store = CheckpointStore(str(stopped / "checkpoints"))
    assert store.steps() == [3] and load_checkpoint(store.latest())["step"] == 3  # complete: state.pt is last
    assert not (stopped / "encoder.pt").exists()

    out = _finish(_run([f"data.shards={shard_set}", f"run_dir={stopped}", *ARGS, "--resume", "auto"]))
    assert "steps 3 -> 6" in out
    _finish(reference)
    assert _losses(straight) == _losses(stopped)
    assert store.steps() == [4, 6]  # keep_last=2 (smoke.yaml)
