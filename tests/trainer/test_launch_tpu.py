"""`octjepa launch-tpu`: the exact commands of a dry run, that a real run executes exactly those, and that the
working-tree archive holds what git would commit (tracked and untracked-not-ignored files) and nothing else."""
from __future__ import annotations

import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from trainer import launch_tpu

BASE = ["--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj", "--config", "configs/smoke.yaml"]
SSH = "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --project=proj --worker=all --command "


def _dry_run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[str]:
    def refuse(*args, **kwargs):
        raise AssertionError(f"--dry-run ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert launch_tpu.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_with_git_ref_prints_exactly_the_commands(capsys, monkeypatch) -> None:
    lines = _dry_run(capsys, monkeypatch, BASE + ["--ref", "v1.2", "--repo", "https://github.com/org/octjepa.git",
                                                  "--resume", "auto", "--dry-run", "--", "data.shards=gs://b/s",
                                                  "max_steps=100"])
    assert lines == [
        SSH + "'set -e; if [ ! -d ~/octjepa/.git ]; then git clone https://github.com/org/octjepa.git ~/octjepa; "
              "fi; git -C ~/octjepa fetch --tags origin v1.2; git -C ~/octjepa checkout --force FETCH_HEAD'",
        SSH + "'set -e; cd ~/octjepa; python3 -m pip install -e \".[train,tpu]\"'",
        SSH + "'cd ~/octjepa && PJRT_DEVICE=TPU python3 -m trainer.train --config configs/smoke.yaml "
              "--resume auto data.shards=gs://b/s max_steps=100'",
    ]


def test_dry_run_copying_the_working_tree(capsys, monkeypatch) -> None:
    lines = _dry_run(capsys, monkeypatch, BASE + ["--dry-run"])
    assert lines == [
        "bash -c 'cd \"$(git rev-parse --show-toplevel)\" && git ls-files -z --cached --others --exclude-standard"
        " | tar -czf /tmp/octjepa-src.tgz --null -T -'",
        "gcloud compute tpus tpu-vm scp /tmp/octjepa-src.tgz pod-1:/tmp/octjepa-src.tgz --zone=us-central2-b "
        "--project=proj --worker=all",
        SSH + "'set -e; mkdir -p ~/octjepa; tar -xzf /tmp/octjepa-src.tgz -C ~/octjepa'",
        SSH + "'set -e; cd ~/octjepa; python3 -m pip install -e \".[train,tpu]\"'",
        SSH + "'cd ~/octjepa && PJRT_DEVICE=TPU python3 -m trainer.train --config configs/smoke.yaml'",
    ]
    for line in lines:
        assert "XLA_USE_BF16" not in line
        if line.startswith("gcloud"):
            assert "--worker=all" in shlex.split(line)


def test_a_real_run_executes_the_printed_commands_in_order(capsys, monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: ran.append(cmd))
    launch_tpu.main(BASE + ["--ref", "main", "--repo", "git@x:y.git", "--skip-install"])
    printed = capsys.readouterr().out.splitlines()
    assert [shlex.join(c) for c in ran] == printed
    assert len(ran) == 2 and "trainer.train" in ran[-1][-1]


def test_working_tree_archive_holds_untracked_files_but_not_ignored_ones(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    (repo / "new_module.py").write_text("y = 2\n")  # untracked, not ignored: the run needs it
    (repo / "runs").mkdir()
    (repo / "runs" / "big.ckpt").write_text("ignored")
    archive = tmp_path / "src.tgz"
    args = launch_tpu.parse_args(BASE + ["--archive", str(archive)])
    subprocess.run(launch_tpu.sync_commands(args)[0], cwd=repo, check=True)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "new_module.py", "tracked.py"]
