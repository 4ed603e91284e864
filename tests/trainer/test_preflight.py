"""Bad settings and inputs stop `octjepa train` with one line before the first step (before any model is built),
and a resume either continues exactly or says why not: a cut latest checkpoint falls back to the previous one,
a mid-epoch checkpoint of a run with another loader-worker count is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import octjepa_cli
import trainer.train
from tests.trainer.shardset_fixture import NARROW_TINY, SMALL_PREDICTOR, SMOKE, make_shard_set, train_args
from trainer.checkpoint import CheckpointStore, load_checkpoint
from trainer.train import main

# Tiny everything: these tests are about what happens around the steps, not in them.
FAST = [
    *SMALL_PREDICTOR,
    "logging.mask_images=false",
    "logging.log_every=1",
]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "set")
    make_shard_set(root, n_train=24, n_val=8, shape=(8, 32, 32))
    return root


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(trainer.train, "VJEPA", refuse)


def _args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return train_args(shards, run_dir, *FAST, *extra)


def _one_line(capsys: pytest.CaptureFixture, argv: list[str], code: int) -> str:
    assert octjepa_cli.main(["train", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("octjepa train: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_missing_config_file_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "nope.yaml")
    err = _one_line(capsys, ["--config", missing], 2)
    assert missing in err and "No such file" in err


def test_a_missing_val_split_is_refused_before_the_first_step(tmp_path: Path, capsys, no_model) -> None:
    shards = str(tmp_path / "no_val")
    make_shard_set(shards, n_train=8, n_val=0, shape=(8, 32, 32))
    err = _one_line(capsys, _args(shards, tmp_path / "run", "val_every=5"), 2)
    assert "val_split='val'" in err and "val_every" in err
    assert not (tmp_path / "run").exists()
    # Without validation the same set is fine (up to the model, which this test does not build).
    with pytest.raises(AssertionError, match="model was built"):
        main(_args(shards, tmp_path / "run", "val_every=0"))


def test_a_batch_larger_than_the_split_is_refused(shard_set: str, tmp_path: Path, capsys, no_model) -> None:
    err = _one_line(capsys, _args(shard_set, tmp_path / "run", "global_batch_size=32", "val_every=0"), 2)
    assert "32 samples per micro-batch" in err and "holds only 24" in err
    # A micro-batch of the whole split is still one epoch of distinct samples.
    with pytest.raises(AssertionError, match="model was built"):
        main(_args(shard_set, tmp_path / "run", "global_batch_size=24", "val_every=0"))


def test_a_missing_unset_or_incomplete_shard_set_is_one_line(shard_set: str, tmp_path: Path, capsys, no_model) -> None:
    err = _one_line(capsys, _args(str(tmp_path / "nowhere"), tmp_path / "run"), 1)
    assert "nowhere" in err and "index.json" in err
    err = _one_line(capsys, ["--config", SMOKE, f"run_dir={tmp_path / 'run'}"], 2)
    assert "data.shards is not set" in err

    cut = tmp_path / "cut"
    make_shard_set(str(cut), n_train=24, n_val=8, shape=(8, 32, 32))
    shard = sorted((cut / "train").glob("*.tar"))[2]
    data = shard.read_bytes()
    os.remove(shard)
    err = _one_line(capsys, _args(str(cut), tmp_path / "run"), 1)
    assert "incomplete" in err and shard.name in err
    shard.write_bytes(data[:1000])  # there again, but cut
    err = _one_line(capsys, _args(str(cut), tmp_path / "run"), 1)
    assert shard.name in err and "1000 bytes" in err


def test_a_cut_latest_checkpoint_falls_back_to_the_previous_one(shard_set: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    common = ["val_every=0", "checkpoint.every_steps=2", "checkpoint.keep_last=3", *NARROW_TINY]
    assert main(_args(shard_set, run_dir, "max_steps=4", *common)) == 0
    store = CheckpointStore(str(run_dir / "checkpoints"))
    assert store.steps() == [2, 4]
    state = run_dir / "checkpoints/step-000000004/state.pt"
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    capsys.readouterr()

    assert main(_args(shard_set, run_dir, "max_steps=4", *common, "--resume", "auto")) == 0
    out = capsys.readouterr()
    assert f"warning: {state}" in out.err and "falling back" in out.err
    assert "resumed from " + str(run_dir / "checkpoints/step-000000002") in out.out
    assert "steps 2 -> 4" in out.out
    assert load_checkpoint(store.latest())["step"] == 4  # step 4 written again, complete this time


def test_a_mid_epoch_resume_with_another_worker_count_is_refused(shard_set: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    # 6 steps per epoch: the checkpoint at step 2 is mid-epoch.
    common = ["val_every=0", "checkpoint.every_steps=2", "max_steps=2", *NARROW_TINY]
    assert main(_args(shard_set, run_dir, *common, "data.num_workers=1")) == 0
    assert load_checkpoint(str(run_dir / "checkpoints/step-000000002"))["step_in_epoch"] == 2
    err = _one_line(
        capsys, _args(shard_set, run_dir, *common, "max_steps=3", "data.num_workers=2", "--resume", "auto"), 2
    )
    assert "data.num_workers=2" in err and "data.num_workers=1" in err and "step-000000002" in err
    # 0 workers is the same single in-process stream as 1: that resume continues.
    assert main(_args(shard_set, run_dir, *common, "max_steps=3", "data.num_workers=0", "--resume", "auto")) == 0


def test_a_cut_tensor_file_of_the_latest_checkpoint_falls_back_too(shard_set: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    common = ["val_every=0", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "max_steps=4", *NARROW_TINY]
    assert main(_args(shard_set, run_dir, *common)) == 0
    (tensors,) = (run_dir / "checkpoints/step-000000004/dcp").glob("*.distcp")
    tensors.write_bytes(tensors.read_bytes()[:4096])
    capsys.readouterr()
    assert main(_args(shard_set, run_dir, *common, "--resume", "auto")) == 0
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if "falling back" in line]
    assert len(warning) == 1 and "checkpoint " + str(run_dir / "checkpoints/step-000000004") in warning[0], out.err
    assert "resumed from " + str(run_dir / "checkpoints/step-000000002") in out.out
