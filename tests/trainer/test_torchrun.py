"""`octjepa train` under torchrun, 2 CPU ranks over gloo: one model trained by both (DDP and FSDP2 give the gradient
a single process gets on the same samples), disjoint shares of the data and the same number of steps, exact resume
after a kill, SIGTERM on one rank stops both with a complete checkpoint, and only rank 0 writes the run's outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.trainer.shardset_fixture import NARROW_TINY, SMALL_PREDICTOR, make_shard_set
from tests.trainer.test_train import assert_same_tensors, checkpoint_tensors
from trainer.checkpoint import CheckpointStore, load_checkpoint, load_encoder

REPO = Path(__file__).resolve().parents[2]
HARNESS = str(REPO / "tests/trainer/torchrun_harness.py")
SMOKE = str(REPO / "configs/smoke.yaml")
SHAPE = "[8,32,32]"
# 2 ranks x 2 samples per micro-batch over 24 train samples: 6 steps per epoch.
COMMON = [
    f"model.encoder.input_shape={SHAPE}",
    f"data.crop_shape={SHAPE}",
    *SMALL_PREDICTOR,
    "global_batch_size=4",
    "val_every=3",
    "data.val_batches=2",
    "logging.log_every=1",
    "logging.mask_images=false",
    "data.num_workers=0",
    *NARROW_TINY,
]
ENV = {"PYTHONPATH": str(REPO), "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _environ() -> dict[str, str]:
    """This process's environment without the W&B service an earlier in-process run may have left in it (ranks
    would attach to it instead of writing their own offline run)."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "set")
    make_shard_set(root, n_train=24, n_val=8, shape=(8, 32, 32))
    return root


def _torchrun(args: list[str], nproc: int = 2, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", HARNESS, *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**_environ(), **ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank it started, as a node that dies takes them all (torchrun starts each rank
    in a process group of its own, so killing its group would leave the ranks running)."""
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for victim in victims:
        victim.kill()
    psutil.wait_procs(victims, timeout=60)
    proc.wait()


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _train_args(shards: str, run_dir: str, ckpt: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        SMOKE,
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"checkpoint.dir={ckpt}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        "max_steps=6",
        *COMMON,
        *extra,
    ]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _keys(directory: Path, rank: int) -> list[list[str]]:
    return [r["keys"] for r in _records(directory / f"keys-rank{rank}.jsonl")]


def test_two_ranks_average_the_gradient_a_single_process_gets(shard_set: str, tmp_path: Path) -> None:
    args = ["grads", str(tmp_path), SMOKE, f"data.shards={shard_set}", *COMMON, "grad_accum=2", "global_batch_size=8"]
    _finish(
        subprocess.Popen(
            [sys.executable, HARNESS, *args],
            cwd=REPO,
            env={**_environ(), **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    )
    _finish(_torchrun(args))
    single = torch.load(tmp_path / "replicated-world1.pt")
    for sharding in ("replicated", "fsdp"):  # DDP, FSDP2
        ranks = torch.load(tmp_path / f"{sharding}-world2.pt")
        assert sorted(ranks["grads"]) == sorted(single["grads"]) and len(single["grads"]) > 10
        for name, grad in single["grads"].items():
            assert grad.abs().sum() > 0, name
            # fp32 sums in another order: within 1e-5 of the tensor's largest entry (6e-7 seen).
            torch.testing.assert_close(
                ranks["grads"][name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=f"{sharding} {name}"
            )
        assert ranks["logged"] == {"loss": 0.5, "skipped": 3.0}  # ranks' losses 0 and 1, skipped 1 and 2
        # Validation and the exported encoder state are what one process computes, whatever the sharding.
        assert set(ranks["val"]) >= {"loss", "rank_target", "rank_pred", "lookup_loss"}
        assert ranks["val"] == pytest.approx(single["val"], rel=1e-5)
        for name, value in single["encoder"].items():
            assert type(ranks["encoder"][name]) is torch.Tensor and torch.equal(ranks["encoder"][name], value), name


def test_ranks_split_the_data_and_only_rank0_writes_outputs(shard_set: str, tmp_path: Path) -> None:
    keys, work, ckpt = tmp_path / "keys", tmp_path / "work", tmp_path / "ckpt"
    keys.mkdir()
    # The preset's shuffle buffer (8 samples: 4 open batches of 2 per rank).
    out = _finish(
        _torchrun(
            _train_args(shard_set, "run", ckpt, "logging.wandb=offline", "sharding=fsdp"),
            HARNESS_KEYS_DIR=str(keys),
            HARNESS_RANK_CWD=str(work),
        )
    )
    assert out.count("train: done at step 6") == 1, out[-3000:]  # rank 0 alone reports

    # One epoch: each rank drew 6 batches of 2; together every train sample exactly once.
    rank0, rank1 = (sum(_keys(keys, r), []) for r in (0, 1))
    assert len(rank0) == len(rank1) == 12 and not set(rank0) & set(rank1)
    assert len(set(rank0) | set(rank1)) == 24

    # Rank 0 wrote the run's outputs; rank 1, in its own working directory, nothing.
    run0 = work / "rank0/run"
    assert not (work / "rank1/run").exists()
    train = [r for r in _records(run0 / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(r["skipped"] == 0 for r in train)
    assert [r["step"] for r in _records(run0 / "metrics.jsonl") if r["split"] == "val"] == [3, 6]
    assert list((run0 / "wandb").glob("offline-run-*/run-*.wandb"))
    # The FSDP2 run's checkpoint is sharded (one file per rank) and its encoder.pt a plain state dict, the
    # checkpoint's target encoder, loadable without torch.distributed.
    store = CheckpointStore(str(ckpt))
    assert store.steps() == [2, 4, 6] and load_checkpoint(store.latest())["host_count"] == 2
    assert sorted(p.name for p in (ckpt / "step-000000006/dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "step-000000006").glob("rng-*.pt")) == ["rng-00000.pt", "rng-00001.pt"]
    encoder, _ = load_encoder(str(run0 / "encoder.pt"))
    tensors = checkpoint_tensors(ckpt / "step-000000006", tmp_path)["model"]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, tensors[f"target_encoder.{name}"]), name


def test_both_ranks_take_every_step_when_one_has_fewer_shards(tmp_path: Path) -> None:
    shards = str(tmp_path / "uneven")
    make_shard_set(shards, n_train=24, n_val=8, shape=(8, 32, 32), samples_per_shard=[14, 2, 2, 2, 2, 2])
    keys = tmp_path / "keys"
    keys.mkdir()
    _finish(
        _torchrun(
            _train_args(shards, str(tmp_path / "run"), tmp_path / "ckpt", "val_every=0"), HARNESS_KEYS_DIR=str(keys)
        )
    )
    assert [len(b) for b in _keys(keys, 0)] == [len(b) for b in _keys(keys, 1)] == [2] * 6
    assert load_checkpoint(CheckpointStore(str(tmp_path / "ckpt")).latest())["step"] == 6


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode()[-4000:])
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir / "metrics.jsonl") if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight(shard_set: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank DDP run of 6 steps (checkpoints at 2, 4, 6): the reference of the resume tests."""
    root = tmp_path_factory.mktemp("straight")
    _finish(
        _torchrun(_train_args(shard_set, str(root / "run"), root / "ckpt", "profile.steps=1", "profile.start_step=2"))
    )
    return root


def test_a_killed_run_resumed_under_torchrun_matches_an_uninterrupted_one(
    shard_set: str, straight: Path, tmp_path: Path
) -> None:
    run_dir, ckpt, marker = tmp_path / "run", tmp_path / "ckpt", tmp_path / "at-step-5"
    proc = _torchrun(_train_args(shard_set, str(run_dir), ckpt), HARNESS_STALL=f"4:0:600:{marker}")
    _wait_for(marker, proc)  # step 4 is done and saved; rank 0 is stalled before step 5
    _kill_node(proc)
    assert CheckpointStore(str(ckpt)).steps() == [2, 4]

    out = _finish(_torchrun(_train_args(shard_set, str(run_dir), ckpt, "--resume", "auto")))
    assert f"resumed from {ckpt / 'step-000000004'}" in out
    # (The reference run traced one step: each rank its own trace.)
    assert sorted(p.name for p in (straight / "run/profile").iterdir()) == ["trace-rank0.json", "trace-rank1.json"]
    a, b = _losses(straight / "run"), _losses(run_dir)
    assert [a[s] for s in (5, 6)] == [b[s] for s in (5, 6)]
    assert_same_tensors(
        checkpoint_tensors(straight / "ckpt/step-000000006", tmp_path),
        checkpoint_tensors(ckpt / "step-000000006", tmp_path),
    )


def test_sigterm_on_one_rank_stops_both_with_a_checkpoint_then_resume_continues(
    shard_set: str, straight: Path, tmp_path: Path
) -> None:
    run_dir, ckpt, marker = tmp_path / "run", tmp_path / "ckpt", tmp_path / "rank1-before-step-3"
    # Rank 1 pauses before step 3 (after the step-2 checkpoint); SIGTERM reaches it then, as a preempted node's would.
    proc = _torchrun(
        _train_args(shard_set, str(run_dir), ckpt, "checkpoint.every_steps=5"), HARNESS_STALL=f"2:1:3:{marker}"
    )
    _wait_for(marker, proc)
    os.kill(int(marker.read_text()), signal.SIGTERM)
    out = _finish(proc)
    assert "stopped by SIGTERM after step 3 of 6" in out, out[-3000:]
    store = CheckpointStore(str(ckpt))
    assert store.steps() == [3] and load_checkpoint(store.latest())["step"] == 3
    assert not (run_dir / "encoder.pt").exists()  # an interrupted run exports nothing as if it were done

    out = _finish(_torchrun(_train_args(shard_set, str(run_dir), ckpt, "checkpoint.every_steps=5", "--resume", "auto")))
    assert "steps 3 -> 6" in out and (run_dir / "encoder.pt").exists()
    a, b = _losses(straight / "run"), _losses(run_dir)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
