"""The TPU-pod path on torch_xla's CPU backend (PJRT_DEVICE=CPU, virtual devices, SPMD, one process per host):
`sharding: fsdp` trains like `replicated` with params and AdamW state sharded and a fixed set of graphs; sharded
checkpoints survive a kill, SIGTERM and a v1 (replicated) checkpoint of an earlier run; several processes playing
hosts make one resume decision, refuse a host-local checkpoint dir, and split the data.

Every run is a fresh subprocess (tests/trainer/torchrun_harness.py) so the XLA runtime does not leak between tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import storage
from tests.trainer.shardset_fixture import NARROW_TINY, SMALL_PREDICTOR, make_shard_set
from tests.trainer.test_train import assert_same_tensors, checkpoint_tensors
from trainer.checkpoint import LEGACY_FORMAT, CheckpointStore, load_checkpoint, load_torch, rng_name, torch_bytes

# Not imported here: torch_xla in the test process would set PJRT_DEVICE for every later test.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")

REPO = Path(__file__).resolve().parents[2]
HARNESS = str(REPO / "tests/trainer/torchrun_harness.py")
SMOKE = str(REPO / "configs/smoke.yaml")
# 8 steps of 4 samples (6 per epoch: the run crosses an epoch), validation at 3 and 6, checkpoints every 2 steps.
ARGS = [
    "device=xla",
    "precision=fp32",
    "max_steps=8",
    "val_every=3",
    "data.val_batches=2",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=10",
    "logging.log_every=1",
    "logging.mask_images=false",
    "global_batch_size=4",
    "model.encoder.input_shape=[8,32,32]",
    "data.crop_shape=[8,32,32]",
    *SMALL_PREDICTOR,
    "data.num_workers=0",
    *NARROW_TINY,
]


def _env(devices: int = 4, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PJRT_", "TPU_"))}
    env.update(
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES=str(devices),
        PYTHONPATH=str(REPO),
        XLA_FLAGS="--xla_backend_optimization_level=0",
        **extra,
    )  # the tests count graphs, not their speed
    return env


def _xla(run_dir: Path, *extra: str, **env: str) -> subprocess.Popen:
    args = [HARNESS, "train", "--config", SMOKE, f"run_dir={run_dir}", *ARGS, *extra]
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == code, out.decode()[-4000:]
    return out.decode()


def _records(run_dir: Path, split: str = "train") -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}  # a rerun step: its last record


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "set")
    make_shard_set(root, n_train=24, n_val=8, shape=(8, 32, 32))
    return root


@pytest.fixture(scope="module")
def fsdp_run(shard_set: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted `sharding=fsdp` run (the reference of the resume tests), with its sharding report."""
    root = tmp_path_factory.mktemp("fsdp")
    _finish(
        _xla(
            root / "run",
            f"data.shards={shard_set}",
            "sharding=fsdp",
            "profile.steps=2",
            "profile.start_step=4",
            HARNESS_REPORT=str(root / "report"),
        )
    )
    return root


def test_fsdp_matches_replicated_with_sharded_state_and_a_fixed_set_of_graphs(
    shard_set: str, fsdp_run: Path, tmp_path: Path
) -> None:
    _finish(
        _xla(
            tmp_path / "run", f"data.shards={shard_set}", "sharding=replicated", HARNESS_REPORT=str(tmp_path / "report")
        )
    )
    fsdp, replicated = _records(fsdp_run / "run"), _records(tmp_path / "run")
    assert sorted(fsdp) == sorted(replicated) == list(range(1, 9))
    for step in range(1, 9):
        assert fsdp[step]["loss"] == pytest.approx(replicated[step]["loss"], rel=1e-5, abs=1e-6), step
    for step in (3, 6):
        assert _records(fsdp_run / "run", "val")[step]["loss"] == pytest.approx(
            _records(tmp_path / "run", "val")[step]["loss"], rel=1e-5
        )

    # Params and AdamW state are split over the 4 devices along the fsdp axis (dim 0, or the first that divides);
    # replicated keeps them whole.
    report = json.loads((fsdp_run / "report-rank0.json").read_text())
    big = "encoder.blocks.0.mlp.fc1.weight"  # (192, 48)
    assert report["params"][big] == "{devices=[4,1]0,1,2,3}"
    assert report["optim"][big] == {"exp_avg": "{devices=[4,1]0,1,2,3}", "exp_avg_sq": "{devices=[4,1]0,1,2,3}"}
    sharded = [n for n, spec in report["params"].items() if spec.startswith("{devices=")]
    assert len(sharded) >= 0.9 * len(report["params"]), sorted(set(report["params"]) - set(sharded))
    plain = json.loads((tmp_path / "report-rank0.json").read_text())
    assert plain["params"][big] in ("", "{replicated}")

    # Compilations stop after the warm-up: step 1 and 2 differ (AdamW creates its state), validation adds its
    # graphs at step 3; from then on every step, validation and checkpoint reuses a compiled graph.
    compiles = [fsdp[s]["xla_compiles"] for s in range(1, 9)]
    assert compiles[3:] == [compiles[3]] * 5, compiles
    assert list((fsdp_run / "run/xla_cache").iterdir()), "the persistent compilation cache stays empty"
    assert [p for p in (fsdp_run / "run/profile").rglob("*") if p.is_file()], "no profile trace of steps 4-5"


def test_a_missing_pallas_dependency_is_a_logged_fallback_at_start(monkeypatch, capsys) -> None:
    from trainer import xla_device

    device = object.__new__(xla_device.XlaDevice)  # the attention choice alone, without starting a runtime
    device.device_type = "TPU"
    monkeypatch.setattr(xla_device, "flash_kernel_missing", lambda: "ModuleNotFoundError: No module named 'jax'")
    assert device.attn_impl("sdpa") == device.attn_impl("xla_flash") == "sdpa"
    err = capsys.readouterr().err
    assert "No module named 'jax'" in err and "torch_xla[pallas]" in err
    monkeypatch.setattr(xla_device, "flash_kernel_missing", lambda: None)
    assert device.attn_impl("sdpa") == "xla_flash" and device.attn_impl("math") == "math"
    device.device_type = "CPU"
    assert device.attn_impl("sdpa") == "xla_flash"  # off-TPU the model computes it with SDPA


def test_sharded_checkpoints_survive_a_kill_and_sigterm(shard_set: str, fsdp_run: Path, tmp_path: Path) -> None:
    run_dir, ckpt = tmp_path / "run", tmp_path / "run/checkpoints"
    common = [f"data.shards={shard_set}", "sharding=fsdp"]
    # 1. Killed (SIGKILL) after the step-4 checkpoint, before step 5.
    marker = tmp_path / "before-5"
    proc = _xla(run_dir, *common, HARNESS_STALL=f"4:0:600:{marker}")
    _wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert CheckpointStore(str(ckpt)).steps() == [2, 4]
    # 2. Resumed; SIGTERM arrives before step 6: the step is finished, saved, and the run exits 0.
    marker = tmp_path / "before-6"
    proc = _xla(run_dir, *common, "--resume", "auto", HARNESS_STALL=f"5:0:3:{marker}")
    _wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = _finish(proc)
    assert "resumed from" in out and "stopped by SIGTERM after step 6 of 8" in out
    assert load_checkpoint(CheckpointStore(str(ckpt)).latest())["step"] == 6
    # 3. Resumed again to the end: the same losses and final state as the uninterrupted run.
    _finish(_xla(run_dir, *common, "--resume", "auto"))
    reference, resumed = _records(fsdp_run / "run"), _records(run_dir)
    assert [reference[s]["loss"] for s in range(1, 9)] == [resumed[s]["loss"] for s in range(1, 9)]
    assert_same_tensors(
        checkpoint_tensors(fsdp_run / "run/checkpoints/step-000000008", tmp_path),
        checkpoint_tensors(ckpt / "step-000000008", tmp_path),
    )


def _as_v1(url: Path, out: Path, scratch: Path) -> None:
    """Rewrite a checkpoint in the v1 format of earlier runs: one state.pt with every tensor, the optimiser state
    keyed by position, the RNG states inside."""
    tensors = checkpoint_tensors(url, scratch)
    state = load_checkpoint(str(url))
    order = [n for g in tensors["optim"]["param_groups"] for n in g["params"]]
    optimizer = {
        "state": {i: tensors["optim"]["state"][n] for i, n in enumerate(order)},
        "param_groups": [
            {**g, "params": [order.index(n) for n in g["params"]]} for g in tensors["optim"]["param_groups"]
        ],
    }
    parts = {
        part: {k[len(part) + 1 :]: v for k, v in tensors["model"].items() if k.startswith(part + ".")}
        for part in ("encoder", "target_encoder", "predictor")
    }
    v1 = {
        **{k: state[k] for k in ("step", "epoch", "step_in_epoch", "seed", "schedules", "config")},
        "format": LEGACY_FORMAT,
        **parts,
        "optimizer": optimizer,
        "rng": load_torch(str(url / rng_name(0))),
    }
    (out / url.name).mkdir(parents=True)
    (out / url.name / "state.pt").write_bytes(torch_bytes(v1))


def test_a_replicated_v1_checkpoint_of_an_earlier_run_resumes_sharded(
    shard_set: str, fsdp_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "old_run_checkpoints"
    _as_v1(fsdp_run / "run/checkpoints/step-000000004", ckpt, tmp_path)
    out = _finish(
        _xla(
            tmp_path / "run",
            f"data.shards={shard_set}",
            "sharding=fsdp",
            f"checkpoint.dir={ckpt}",
            "--resume",
            "auto",
            HARNESS_REPORT=str(tmp_path / "report"),
        )
    )
    assert f"resumed from {ckpt / 'step-000000004'}" in out
    reference, resumed = _records(fsdp_run / "run"), _records(tmp_path / "run")
    # The same run from there, within fp32 rounding (the state arrives whole and is sharded on the device, so
    # the first graphs differ from those of a sharded load; 1e-7 seen).
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
    report = json.loads((tmp_path / "report-rank0.json").read_text())
    assert report["optim"]["encoder.blocks.0.mlp.fc1.weight"]["exp_avg"] == "{devices=[4,1]0,1,2,3}"


# ---- several processes playing the hosts of a pod ----------------------------------------------------------------


def _hosts(run_dir: str, *extra: str, **env: str) -> subprocess.Popen:
    """2 processes, each an SPMD "host" with 2 CPU devices; a gloo group over them stands in for xla://."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        HARNESS,
        "train",
        "--config",
        SMOKE,
        f"run_dir={run_dir}",
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(devices=2, HARNESS_GLOO="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_hosts_refuse_a_local_checkpoint_dir(shard_set: str, tmp_path: Path) -> None:
    out = _finish(_hosts(str(tmp_path / "run"), f"data.shards={shard_set}"), code=1)
    assert out.count("is on this host's disk, but the run has 2 hosts") == 2, out[-3000:]
    assert not list((tmp_path / "run").glob("*.jsonl")) and not (tmp_path / "run/checkpoints").exists()


def test_hosts_agree_on_the_resume_step_and_split_the_data(shard_set: str, tmp_path: Path, gcs: str) -> None:
    ckpt = f"{gcs}/runs/pod/checkpoints"
    keys = tmp_path / "keys"
    keys.mkdir()
    common = [f"data.shards={shard_set}", f"checkpoint.dir={ckpt}", "val_every=0"]
    _finish(_hosts(str(tmp_path / "run"), *common, "max_steps=4", HARNESS_KEYS_DIR=str(keys)))
    assert CheckpointStore(ckpt).steps() == [2, 4] and load_checkpoint(f"{ckpt}/step-000000004")["host_count"] == 2
    assert storage.exists(f"{ckpt}/step-000000004/{rng_name(1)}")

    # Host 1 cannot see any checkpoint (as a host resolving `latest` on its own local disk would not): both
    # resume from the one host 0 found.
    _finish(
        _hosts(
            str(tmp_path / "run"),
            *common,
            "max_steps=6",
            "--resume",
            "auto",
            HARNESS_KEYS_DIR=str(keys),
            HARNESS_BLIND_RANK="1",
            HARNESS_REPORT=str(tmp_path / "report"),
        )
    )
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report-rank{rank}.json").read_text())
        assert report["resumed_from"] == f"{ckpt}/step-000000004", report

    # Epoch 0 (steps 1-6, over both runs): each host drew 6 batches of 2, disjoint, together the whole split.
    drawn = {
        rank: [json.loads(line) for line in (keys / f"keys-rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    assert [len(drawn[0]), len(drawn[1])] == [6, 6]
    host0, host1 = (sum((r["keys"] for r in drawn[rank]), []) for rank in (0, 1))
    assert not set(host0) & set(host1) and len(set(host0) | set(host1)) == 24
    assert load_checkpoint(CheckpointStore(ckpt).latest())["step"] == 6
