"""Run training on every host of a TPU pod: sync the code, install it with its TPU extra, start the trainer detached.

    octjepa launch-tpu --tpu octjepa-v4-32 --zone us-central2-b --project P \\
        --config configs/pretrain_vjepa_multi_domain.yaml --ref main --resume auto \\
        -- data.shards=gs://b/oct-shards checkpoint.dir=gs://b/runs/multi/checkpoints
    octjepa launch-tpu ... --status           # on every host: is the trainer running, and its log's last lines
    octjepa launch-tpu ... --stop             # SIGTERM on every host: the trainers save a checkpoint and exit 0
    octjepa launch-tpu ... --dry-run          # print exactly the commands, run nothing
    python -m trainer.launch_tpu ...          # the same

Every remote command goes through `gcloud compute tpus tpu-vm ssh --worker=all`: a pod slice runs one trainer
process per host, and all of them must start (the SPMD runtime waits for every host). Code sync is either
`--ref REF` (clone the repository on first use, then fetch REF and check it out, on every host) or, without
`--ref`, an archive of this checkout's tracked files (what `git ls-files` lists, as in the working tree) plus the
paths named with `--include`, sent with `tpu-vm scp`; untracked shard sets, runs and checkpoints never travel.
The install follows the torch_xla guide for TPU VMs (Python 3.10-3.12): torch's CPU wheel, then the package with
`.[train,tpu]` (torch_xla[tpu,pallas]). The trainer runs detached (`setsid nohup`), with `PJRT_DEVICE=TPU`, its
output in a log file on each host (`--log`), its process group id in a pid file beside it; bf16 comes from
autocast in the trainer, never from the deprecated `XLA_USE_BF16`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

REMOTE_DIR = "~/octjepa"
ARCHIVE = "/tmp/octjepa-src.tgz"
LOG = "~/octjepa-train.log"
TRAIN_ENV = {"PJRT_DEVICE": "TPU"}
# torch's CPU build for the TPU hosts (the PyPI wheel for Linux is the CUDA build, gigabytes the TPU never uses);
# the version is the one setup.py pins for .[train] (a test keeps them equal).
TORCH_CPU = "torch==2.9.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="octjepa launch-tpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--config", help="trainer config, relative to the repository root (to start a run)")
    p.add_argument(
        "--ref", default=None, help="git ref to check out on every host; omit to send this checkout's tracked files"
    )
    p.add_argument("--repo", default=None, help="git URL to clone (with --ref); default: this checkout's origin")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="an untracked file or folder to send too (without --ref; repeatable)",
    )
    p.add_argument("--remote-dir", default=REMOTE_DIR, help=f"checkout directory on the hosts (default {REMOTE_DIR})")
    p.add_argument("--python", default="python3", help="python on the hosts")
    p.add_argument("--archive", default=ARCHIVE, help=f"source archive path, here and on the hosts (default {ARCHIVE})")
    p.add_argument("--log", default=LOG, help=f"the trainer's log file on each host (default {LOG})")
    p.add_argument("--resume", default=None, help="passed to the trainer: 'auto' or a checkpoint path")
    p.add_argument("--skip-install", action="store_true", help="do not run pip install (code already installed)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="show whether the trainer runs on each host, and its log")
    action.add_argument("--stop", action="store_true", help="SIGTERM the trainer on every host (it saves and exits)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("overrides", nargs="*", help="trainer key=value overrides (after --)")
    args = p.parse_args(argv)
    if not (args.status or args.stop or args.config):
        p.error("--config is required to start a run (or use --status / --stop)")
    return args


def ssh(args: argparse.Namespace, command: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        args.tpu,
        f"--zone={args.zone}",
        f"--project={args.project}",
        "--worker=all",
        "--command",
        command,
    ]


def origin_url() -> str:
    out = subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit("launch-tpu: --ref needs --repo URL (this checkout has no 'origin' remote)")
    return out.stdout.strip()


def archive_command(args: argparse.Namespace) -> list[str]:
    """Tar this checkout's tracked files (as they are in the working tree) and the --include paths, nothing else."""
    listing = "git ls-files -z --cached"
    if args.include:
        listing = f"{{ {listing}; printf '%s\\0' {' '.join(shlex.quote(p) for p in args.include)}; }}"
    return [
        "bash",
        "-c",
        f'cd "$(git rev-parse --show-toplevel)" && {listing} | tar -czf {shlex.quote(args.archive)} --null -T -',
    ]


def sync_commands(args: argparse.Namespace) -> list[list[str]]:
    d, a = args.remote_dir, shlex.quote(args.archive)
    if args.ref is not None:
        repo = args.repo or origin_url()
        # FETCH_HEAD works for branches, tags and commit ids alike, and never leaves a stale local branch.
        return [
            ssh(
                args,
                f"set -e; if [ ! -d {d}/.git ]; then git clone {shlex.quote(repo)} {d}; fi; "
                f"git -C {d} fetch --tags origin {shlex.quote(args.ref)}; "
                f"git -C {d} checkout --force FETCH_HEAD",
            )
        ]
    return [
        archive_command(args),
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            args.archive,
            f"{args.tpu}:{args.archive}",
            f"--zone={args.zone}",
            f"--project={args.project}",
            "--worker=all",
        ],
        ssh(args, f"set -e; mkdir -p {d}; tar -xzf {a} -C {d}"),
    ]


def install_command(args: argparse.Namespace) -> list[str]:
    py = args.python
    return ssh(
        args,
        f"set -e; cd {args.remote_dir}; {py} -m pip install --upgrade pip; "
        f"{py} -m pip install {TORCH_CPU} --index-url {TORCH_CPU_INDEX}; "
        f'{py} -m pip install -e ".[train,tpu]"',
    )


def _pid_file(args: argparse.Namespace) -> str:
    return f"{args.log}.pid"


def train_command(args: argparse.Namespace) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in TRAIN_ENV.items())
    train = [args.python, "-m", "trainer.train", "--config", args.config]
    if args.resume:
        train += ["--resume", args.resume]
    train += list(args.overrides)
    # Detached: the ssh session ends at once and takes nothing with it (setsid: a session of its own; nohup).
    return ssh(
        args,
        f"cd {args.remote_dir} && {env} setsid nohup {shlex.join(train)} > {args.log} 2>&1 < /dev/null "
        f'& echo $! > {_pid_file(args)}; echo "started $(hostname): pid $(cat {_pid_file(args)}), '
        f'log {args.log}"',
    )


def status_command(args: argparse.Namespace) -> list[str]:
    pid = _pid_file(args)
    return ssh(
        args,
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "$(hostname): running '
        f'(pid $(cat {pid}))"; else echo "$(hostname): not running"; fi; tail -n 5 {args.log} '
        f"2>/dev/null || true",
    )


def stop_command(args: argparse.Namespace) -> list[str]:
    pid = _pid_file(args)
    # SIGTERM, as a preemption would: each trainer finishes its step, writes a complete checkpoint and exits 0.
    return ssh(
        args,
        f'if [ -f {pid} ] && kill -TERM "$(cat {pid})" 2>/dev/null; then echo "$(hostname): '
        f'SIGTERM sent"; else echo "$(hostname): not running"; fi',
    )


def commands(args: argparse.Namespace) -> list[list[str]]:
    """Every command of the launch, in order (the dry run prints exactly these)."""
    if args.status:
        return [status_command(args)]
    if args.stop:
        return [stop_command(args)]
    cmds = sync_commands(args)
    if not args.skip_install:
        cmds.append(install_command(args))
    cmds.append(train_command(args))
    return cmds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for cmd in commands(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
