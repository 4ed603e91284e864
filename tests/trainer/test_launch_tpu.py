"""`octjepa launch-tpu`: the exact commands of a dry run (install with torch's CPU wheel, the trainer detached with a
log on each host, --status, --stop), that a real run executes exactly those, and that the source archive holds the
tracked files and the --include allow-list, never an untracked file (shard sets, runs, checkpoints)."""

from __future__ import annotations

import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from trainer import launch_tpu

BASE = ["--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj", "--config", "configs/smoke.yaml"]
SSH = "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --project=proj --worker=all --command "
INSTALL = (
    "'set -e; cd ~/octjepa; python3 -m pip install --upgrade pip; python3 -m pip install torch==2.9.0 "
    '--index-url https://download.pytorch.org/whl/cpu; python3 -m pip install -e ".[train,tpu]"\''
)
PID = "~/octjepa-train.log.pid"


def _detached(train: str) -> str:
    return (
        SSH + f"'cd ~/octjepa && PJRT_DEVICE=TPU setsid nohup {train} > ~/octjepa-train.log 2>&1 < /dev/null & "
        f'echo $! > {PID}; echo "started $(hostname): pid $(cat {PID}), log ~/octjepa-train.log"\''
    )


def _dry_run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[str]:
    def refuse(*args, **kwargs):
        raise AssertionError(f"--dry-run ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert launch_tpu.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_with_git_ref_prints_exactly_the_commands(capsys, monkeypatch) -> None:
    lines = _dry_run(
        capsys,
        monkeypatch,
        BASE
        + [
            "--ref",
            "v1.2",
            "--repo",
            "https://github.com/org/octjepa.git",
            "--resume",
            "auto",
            "--dry-run",
            "--",
            "data.shards=gs://b/s",
            "max_steps=100",
        ],
    )
    assert lines == [
        SSH + "'set -e; if [ ! -d ~/octjepa/.git ]; then git clone https://github.com/org/octjepa.git ~/octjepa; "
        "fi; git -C ~/octjepa fetch --tags origin v1.2; git -C ~/octjepa checkout --force FETCH_HEAD'",
        SSH + INSTALL,
        _detached(
            "python3 -m trainer.train --config configs/smoke.yaml --resume auto data.shards=gs://b/s max_steps=100"
        ),
    ]


def test_dry_run_copying_the_working_tree(capsys, monkeypatch) -> None:
    lines = _dry_run(capsys, monkeypatch, BASE + ["--dry-run"])
    assert lines == [
        'bash -c \'cd "$(git rev-parse --show-toplevel)" && git ls-files -z --cached'
        " | tar -czf /tmp/octjepa-src.tgz --null -T -'",
        "gcloud compute tpus tpu-vm scp /tmp/octjepa-src.tgz pod-1:/tmp/octjepa-src.tgz --zone=us-central2-b "
        "--project=proj --worker=all",
        SSH + "'set -e; mkdir -p ~/octjepa; tar -xzf /tmp/octjepa-src.tgz -C ~/octjepa'",
        SSH + INSTALL,
        _detached("python3 -m trainer.train --config configs/smoke.yaml"),
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


def test_status_and_stop_reach_every_host(capsys, monkeypatch) -> None:
    status = _dry_run(capsys, monkeypatch, BASE[:6] + ["--status", "--dry-run"])
    assert status == [
        SSH + f'\'if [ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null; then echo "$(hostname): '
        f'running (pid $(cat {PID}))"; else echo "$(hostname): not running"; fi; tail -n 5 '
        "~/octjepa-train.log 2>/dev/null || true'"
    ]
    stop = _dry_run(capsys, monkeypatch, BASE[:6] + ["--stop", "--dry-run"])
    # SIGTERM: each trainer finishes its step, saves a complete checkpoint and exits 0.
    assert stop == [
        SSH + f'\'if [ -f {PID} ] && kill -TERM "$(cat {PID})" 2>/dev/null; then echo "$(hostname): '
        'SIGTERM sent"; else echo "$(hostname): not running"; fi\''
    ]
    with pytest.raises(SystemExit):
        launch_tpu.parse_args(BASE[:6])  # starting a run needs --config


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("y = 1\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    (repo / "tracked.py").write_text("x = 2\n")  # edited, not committed: shipped as it is
    (repo / "pkg" / "shards_out").mkdir()  # an output written inside a package folder, untracked
    (repo / "pkg" / "shards_out" / "shard-000000.tar").write_text("data")
    (repo / "new_config.yaml").write_text("a: 1\n")  # untracked, not ignored
    (repo / "notes").mkdir()
    (repo / "notes" / "n.txt").write_text("n")
    (repo / "runs").mkdir()
    (repo / "runs" / "big.ckpt").write_text("ignored")
    return repo


def _archived(repo: Path, tmp_path: Path, *extra: str) -> list[str]:
    archive = tmp_path / "src.tgz"
    args = launch_tpu.parse_args(BASE + ["--archive", str(archive), *extra])
    subprocess.run(launch_tpu.sync_commands(args)[0], cwd=repo, check=True)
    with tarfile.open(archive) as tar:
        if "tracked.py" in tar.getnames():
            assert tar.extractfile("tracked.py").read() == b"x = 2\n"
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def test_the_archive_holds_tracked_files_and_the_allow_list_only(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert _archived(repo, tmp_path) == [".gitignore", "pkg/mod.py", "tracked.py"]
    assert _archived(repo, tmp_path, "--include", "new_config.yaml", "--include", "notes") == [
        ".gitignore",
        "new_config.yaml",
        "notes/n.txt",
        "pkg/mod.py",
        "tracked.py",
    ]
