"""The train step compiles a fixed set of XLA graphs: 20 SPMD steps (bf16 autocast and a new learning rate, EMA
momentum and masks every step, as on a TPU) on torch_xla's CPU backend over 4 virtual devices, must stop compiling
after the first few steps. This is what keeps the trainer usable on real TPUs, where every recompilation costs
minutes.

Runs in a subprocess so PJRT_DEVICE, CPU_NUM_DEVICES and xr.use_spmd() do not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainer.shardset_fixture import SMALL_PREDICTOR, make_shard_set

REPO = Path(__file__).resolve().parents[2]

# The subprocess: the real `trainer.train.main` on device=xla, where the host-side batch flattening records a
# digest of every batch's masks so the test can check they changed from step to step.
SCRIPT = r"""
import hashlib, sys
import trainer.batch
_flatten = trainer.batch.flatten_batch
def recording_flatten(batch):
    digest = hashlib.sha1(b"".join(c.numpy().tobytes() + t.numpy().tobytes() for c, t in batch["masks"]))
    print("MASKS", digest.hexdigest(), flush=True)
    return _flatten(batch)
trainer.batch.flatten_batch = recording_flatten
from trainer.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_compilations_stop_growing_over_20_steps_with_changing_masks(tmp_path: Path) -> None:
    pytest.importorskip("torch_xla")
    shards = str(tmp_path / "set")
    make_shard_set(shards, n_train=24, n_val=8, shape=(8, 32, 32))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PJRT_", "TPU_"))}
    env.update(
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES="4",
        PYTHONPATH=str(REPO),
        # Fewer LLVM passes: the test counts graphs, not their speed.
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )
    args = [
        "--config",
        str(REPO / "configs/smoke.yaml"),
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "device=xla",
        "precision=bf16",
        "max_steps=20",
        "val_every=5",
        "data.val_batches=2",
        "checkpoint.every_steps=0",
        "logging.log_every=1",
        "logging.mask_images=false",
        "global_batch_size=4",
        "model.encoder.input_shape=[8,32,32]",
        "data.crop_shape=[8,32,32]",
        *SMALL_PREDICTOR,
        # ViT-Tiny narrowed to 2 blocks: the same graph structure, a fraction of the XLA CPU compile time.
        "model.encoder.embed_dim=48",
        "model.encoder.depth=2",
        "model.encoder.num_heads=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The config as the user gave it; the kernel the platform chose for "sdpa" (flash attention on XLA) beside it.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["encoder"]["attn_impl"] == "sdpa"
    assert yaml.safe_load((run_dir / "resolved.yaml").read_text())["attn_impl"] == "xla_flash"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == list(range(1, 21))
    compiles = [train[s]["xla_compiles"] for s in range(1, 21)]
    # Step 1 and 2 differ (AdamW creates its state in step 1); the first validation (after step 5, seen at step
    # 6) adds the forward-only graphs. From then on every step and every validation reuses a compiled graph.
    assert compiles[0] > 0
    assert compiles[5:] == [compiles[5]] * 15, f"compilations per step kept growing: {compiles}"
    assert len([r for r in records if r["split"] == "val"]) == 4
    train_digests = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MASKS")]
    assert len(set(train_digests)) >= 20, "every training batch should carry different masks"
