"""The ``octjepa`` command: one entry point, one subcommand per job.

    octjepa synth --out data/                       # a synthetic AI-READI-like dataset
    octjepa inspect FILE.dcm gs://bucket/x.dcm      # what the pipeline thinks of a file
    octjepa preprocess --manifest M --data-root R --output O
    octjepa reshard --input O --output O2 --by device
    octjepa verify O
    octjepa train --config configs/smoke.yaml
    octjepa embed|probe|preview|launch-tpu|demo ...

Each subcommand lives in its package and is imported only when asked for, so a Beam worker without torch and a
trainer without Beam both have a working ``octjepa``. Errors the user must fix (``shards.errors.OctjepaError``:
bad settings, bad or incomplete inputs) become one line on stderr and the error's exit code, for every subcommand.
"""

from __future__ import annotations

import importlib
import sys

from shards.errors import OctjepaError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("synth.dataset", "main", "write a synthetic AI-READI-like OCT dataset"),
    "inspect": ("beam_jobs.inspect", "main", "print what the reader makes of DICOM files (JSON lines)"),
    "preprocess": ("beam_jobs.preprocess", "main", "Beam job: DICOMs -> WebDataset shards + index"),
    "reshard": ("beam_jobs.reshard", "main", "Beam job: re-shard a shard set per device domain / field"),
    "verify": ("shards.verify", "main", "check every shard of a set against its index"),
    "train": ("trainer.train", "main", "pretrain V-JEPA2 3D on a shard set"),
    "embed": ("trainer.embed", "main_embed", "write frozen-encoder embeddings of a shard set"),
    "probe": ("trainer.probe", "main_probe", "linear probe of a frozen encoder vs random init"),
    "preview": ("trainer.preview", "main", "montage of a shard set per domain (and masks)"),
    "launch-tpu": ("trainer.launch_tpu", "main", "run training on every host of a TPU pod"),
    "demo": ("trainer.demo", "main", "the whole pipeline on synthetic data, on this machine"),
}


def usage() -> str:
    lines = ["usage: octjepa <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"octjepa: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
    except OctjepaError as exc:
        print(f"octjepa {name}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    return int(result or 0)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a message quoting a file's lines keeps them, separated by ' | ')."""
    return " | ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
