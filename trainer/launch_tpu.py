"""Run training on every host of a TPU pod: sync the code, install it with its TPU extra, start the trainer.

    octjepa launch-tpu --tpu octjepa-v4-32 --zone us-central2-b --project P \
        --config configs/pretrain_vjepa_multi_domain.yaml --ref main --resume auto -- data.shards=gs://b/oct-shards
    octjepa launch-tpu ... --dry-run          # print exactly the commands, run nothing
    python -m trainer.launch_tpu ...          # the same

Every remote command goes through `gcloud compute tpus tpu-vm ssh --worker=all`: a pod slice runs one trainer
process per host, and all of them must start (the SPMD runtime waits for every host). Code sync is either
`--ref REF` (clone the repository on first use, then fetch REF and check it out, on every host) or, without
`--ref`, a copy of this working tree (tracked and untracked-but-not-ignored files) sent with `tpu-vm scp`.
The trainer runs with `PJRT_DEVICE=TPU`; bf16 comes from autocast in the trainer, never from the deprecated
`XLA_USE_BF16`.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

REMOTE_DIR = "~/octjepa"
ARCHIVE = "/tmp/octjepa-src.tgz"
TRAIN_ENV = {"PJRT_DEVICE": "TPU"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="octjepa launch-tpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--config", required=True, help="trainer config, relative to the repository root")
    p.add_argument("--ref", default=None, help="git ref to check out on every host; omit to copy the working tree")
    p.add_argument("--repo", default=None, help="git URL to clone (with --ref); default: this checkout's origin")
    p.add_argument("--remote-dir", default=REMOTE_DIR, help=f"checkout directory on the hosts (default {REMOTE_DIR})")
    p.add_argument("--python", default="python3", help="python on the hosts")
    p.add_argument("--archive", default=ARCHIVE, help=f"working-tree archive path, here and on the hosts "
                                                    f"(default {ARCHIVE})")
    p.add_argument("--resume", default=None, help="passed to the trainer: 'auto' or a checkpoint path")
    p.add_argument("--skip-install", action="store_true", help="do not run pip install (code already installed)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("overrides", nargs="*", help="trainer key=value overrides (after --)")
    return p.parse_args(argv)


def ssh(args: argparse.Namespace, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
            f"--project={args.project}", "--worker=all", "--command", command]


def origin_url() -> str:
    out = subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit("launch-tpu: --ref needs --repo URL (this checkout has no 'origin' remote)")
    return out.stdout.strip()


def sync_commands(args: argparse.Namespace) -> list[list[str]]:
    d, a = args.remote_dir, shlex.quote(args.archive)
    if args.ref is not None:
        repo = args.repo or origin_url()
        # FETCH_HEAD works for branches, tags and commit ids alike, and never leaves a stale local branch.
        return [ssh(args, f"set -e; if [ ! -d {d}/.git ]; then git clone {shlex.quote(repo)} {d}; fi; "
                          f"git -C {d} fetch --tags origin {shlex.quote(args.ref)}; "
                          f"git -C {d} checkout --force FETCH_HEAD")]
    return [
        ["bash", "-c", f"cd \"$(git rev-parse --show-toplevel)\" && "
                       f"git ls-files -z --cached --others --exclude-standard | tar -czf {a} --null -T -"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", args.archive, f"{args.tpu}:{args.archive}",
         f"--zone={args.zone}", f"--project={args.project}", "--worker=all"],
        ssh(args, f"set -e; mkdir -p {d}; tar -xzf {a} -C {d}"),
    ]


def install_command(args: argparse.Namespace) -> list[str]:
    return ssh(args, f"set -e; cd {args.remote_dir}; {args.python} -m pip install -e \".[train,tpu]\"")


def train_command(args: argparse.Namespace) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in TRAIN_ENV.items())
    train = [args.python, "-m", "trainer.train", "--config", args.config]
    if args.resume:
        train += ["--resume", args.resume]
    train += list(args.overrides)
    return ssh(args, f"cd {args.remote_dir} && {env} {shlex.join(train)}")


def commands(args: argparse.Namespace) -> list[list[str]]:
    """Every command of the launch, in order (the dry run prints exactly these)."""
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
