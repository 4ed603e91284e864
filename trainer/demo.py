"""The whole pipeline on synthetic data, on this machine: the README's first command.

    octjepa demo --workdir demo_workdir               # the default: well under 15 minutes on 2 CPU cores
    octjepa demo --workdir /tmp/demo --reduced        # a few minutes: what CI runs
    octjepa demo --workdir W --participants 24 --steps 60 --seed 1

Stages, each a subprocess (``python -m octjepa_cli <stage> ...``) so Beam's worker processes and torch never share
an interpreter; their output streams here under a stage header and is kept in ``W/logs/<stage>.log``:

1. synth       a synthetic AI-READI-like dataset, all four devices, plus broken files   -> W/data
2. preprocess  Beam (local FnApiRunner): DICOM -> shards, broken files -> errors.jsonl  -> W/shards
3. reshard     Beam: one shard set per device domain                                   -> W/shards_by_device
4. verify      every shard of the multi-domain set against its index
5. train       CPU pretraining with configs/smoke.yaml on the multi-domain set W/shards -> W/run
6. probe       probes with known answers (synth's anatomy table: study group, thickness,  -> W/probe
               thinning, curvature, depth, foci, cysts): the target and online encoders
               of the last checkpoint, a random-init encoder and a raw-voxel baseline,
               repeated grouped CV by participant with 95% intervals and paired differences
7. embed       one embedding row per volume (the exported encoder.pt)                   -> W/embeddings.npz/.tsv
8. preview     a row per device set of step 3, and the mask configurations              -> W/preview*.png

Then ``W/report.json`` and ``W/report.png`` (``trainer.demo_report``): the probe intervals, the training's
collapse diagnostics (val loss over every val volume, the per-position lookup baseline, effective ranks) and the
two goals of issue 14 judged on them.

Training and probing use the preprocessing output (every device in one set, natural mix); the per-device sets of
step 3 are what a single-domain run (``data.shards=W/shards_by_device/<device>``) would train on.

The demo preprocesses to the train config's input shape over a fixed physical window (``DEMO_WINDOW_MM``, about
the 6 x 6 mm macular cube and the full ~2.5 mm depth), so the smoke model sees whole scans. With the seed grid
(64 x 384 x 384 at 20 um) a 16 x 64 x 64 smoke crop would be 1.3 mm wide and mostly empty padding above or below
the retina, and every stage would move 150 times more bytes.

The stored volumes are ``DEPTH_MARGIN`` times taller than the model's input at the same spacing, so training
draws random depth crops (the retina moves by up to two token rows) while probes and embeddings take the centre
crop. Preprocessing centres every retina in its window: without the margin every volume has its layers at the
same rows, position alone predicts most target features, and the encoder collapsed onto position (demo seed 1:
no anatomy target above random init; with the margin, seeds 0 and 1 both had three or more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"
DEMO_WINDOW_MM = (6.4, 2.56, 6.4)  # (across B-scans, depth, lateral) covered by the model's input
DEPTH_MARGIN = 1.5  # stored depth / input depth: the room for random depth crops in training


@dataclass(frozen=True)
class DemoSettings:
    # 80 participants: the grouped CV's test folds hold 16 people (with 40 they held 8, and an interval from
    # such folds spans most of the metric's range). Synthesis and preprocessing stay under a minute each.
    participants: int = 80
    # 0.15 keeps every device's synthetic grid at least as fine as the demo's preprocessing grid on every axis
    # (Triton's lateral pitch is the limit), and makes the synthesis ~5x cheaper than 0.25.
    scale: float = 0.15
    # 400 steps (about 4 minutes on 2 idle cores) move the encoder far enough from its init for the probe to see
    # it; at 40 steps the "pretrained" encoder was within 0.5% of its random init and no better on the probe.
    steps: int = 400
    seed: int = 0
    batch_size: int = 4
    # CV repeats of the probes: the interval's width is set mostly by the folds' shared training data (the
    # corrected t), which more repeats do not shrink; 5 x 5 folds keep the probe stage to a minute or two.
    repeats: int = 5


REDUCED = DemoSettings(participants=8, scale=0.1, steps=4, repeats=1)


class StageError(RuntimeError):
    """A demo stage exited non-zero; the message names the stage, its exit code, command and log."""


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    args: list[str]  # octjepa subcommand and its arguments


def demo_grid(input_shape: tuple[int, int, int]) -> list[str]:
    """Preprocessing overrides: the model's input spacing over DEMO_WINDOW_MM, stored DEPTH_MARGIN times deeper."""
    spacing = [round(mm / n, 6) for mm, n in zip(DEMO_WINDOW_MM, input_shape)]
    stored = (input_shape[0], round(input_shape[1] * DEPTH_MARGIN), input_shape[2])
    return [
        "--set",
        f"target_shape=[{','.join(map(str, stored))}]",
        "--set",
        f"target_spacing_mm=[{','.join(map(str, spacing))}]",
    ]


def probe_targets() -> tuple[str, ...]:
    """study_group, then every column of synth's anatomy table (the demo runs synth, so it knows its table)."""
    from synth.volumes import ANATOMY_COLUMNS

    return ("study_group",) + ANATOMY_COLUMNS


def plan(
    work: Path, s: DemoSettings, config: Path, input_shape: tuple[int, int, int], export_encoder: str = "target"
) -> tuple[list[Stage], dict[str, Path]]:
    """The stages and every output path they produce. The probe compares both encoders of the last checkpoint,
    the exported one (``export_encoder``) first, so its paired difference is the report's."""
    from trainer.checkpoint import ENCODER_KINDS

    out = {
        "dataset": work / "data",
        "manifest": work / "data" / "retinal_oct" / "manifest.tsv",
        "participants": work / "data" / "participants.tsv",
        "anatomy": work / "data" / "synth_anatomy.tsv",
        "shards": work / "shards",
        "errors": work / "shards" / "errors.jsonl",
        "shards_by_device": work / "shards_by_device",
        "run": work / "run",
        "checkpoints": work / "run" / "checkpoints",
        "encoder": work / "run" / "encoder.pt",
        "loss_curve": work / "run" / "loss_curve.png",
        "probe_report": work / "probe" / "report.json",
        "probe_plot": work / "probe" / "probe.png",
        "embeddings": work / "embeddings.npz",
        "embeddings_tsv": work / "embeddings.tsv",
        "preview": work / "preview.png",
        "preview_masks": work / "preview_masks.png",
        "report": work / "report.json",
        "report_png": work / "report.png",
        "logs": work / "logs",
    }
    kinds = [export_encoder] + [k for k in ENCODER_KINDS if k != export_encoder]
    stages = [
        Stage(
            "synth",
            "synthetic AI-READI-like dataset: all four devices, plus broken files",
            [
                "synth",
                "--out",
                str(out["dataset"]),
                "--participants",
                str(s.participants),
                "--scale",
                str(s.scale),
                "--seed",
                str(s.seed),
                "--broken",
            ],
        ),
        Stage(
            "preprocess",
            "Beam on the local runner: DICOM -> WebDataset shards; bad files -> errors.jsonl",
            [
                "preprocess",
                "--manifest",
                str(out["manifest"]),
                "--data-root",
                str(out["dataset"]),
                "--output",
                str(out["shards"]),
                "--participants",
                str(out["participants"]),
                *demo_grid(input_shape),
            ],
        ),
        Stage(
            "reshard",
            "Beam: one shard set per device domain, sample bytes copied untouched",
            ["reshard", "--input", str(out["shards"]), "--output", str(out["shards_by_device"]), "--by", "device"],
        ),
        Stage(
            "verify", "every shard of the multi-domain set checked against index.json", ["verify", str(out["shards"])]
        ),
        Stage(
            "train",
            f"V-JEPA 2 3D pretraining on the CPU, {config.name}, {s.steps} steps, multi-domain set",
            [
                "train",
                "--config",
                str(config),
                f"data.shards={out['shards']}",
                f"run_dir={out['run']}",
                f"max_steps={s.steps}",
                f"seed={s.seed}",
            ],
        ),
        Stage(
            "probe",
            "probes with known answers: target and online encoders vs random init and raw voxels",
            [
                "probe",
                "--checkpoint",
                str(out["checkpoints"]),
                "--encoders",
                ",".join(kinds),
                "--shards",
                str(out["shards"]),
                "--labels",
                str(out["anatomy"]),
                "--targets",
                ",".join(probe_targets()),
                "--repeats",
                str(s.repeats),
                "--out",
                str(out["probe_report"].parent),
                "--seed",
                str(s.seed),
                "--batch-size",
                str(s.batch_size),
                "--device",
                "cpu",
            ],
        ),
        Stage(
            "embed",
            "frozen-encoder embeddings, one row per volume",
            [
                "embed",
                "--checkpoint",
                str(out["encoder"]),
                "--shards",
                str(out["shards"]),
                "--out",
                str(out["embeddings"]),
                "--batch-size",
                str(s.batch_size),
                "--device",
                "cpu",
            ],
        ),
        Stage(
            "preview",
            "montage of each device's shard set, and the mask configurations",
            [
                "preview",
                "--shards",
                str(out["shards_by_device"]),
                "--out",
                str(out["preview"]),
                "--masks",
                "--config",
                str(config),
            ],
        ),
    ]
    return stages, out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The children import the same checkout as this process, installed or not; and print as they go.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_stage(number: int, total: int, stage: Stage, logs: Path) -> float:
    """Run one stage, streaming its output under a header; returns its wall time in seconds."""
    command = [sys.executable, "-m", "octjepa_cli", *stage.args]
    print(f"\n=== [{number}/{total}] {stage.name}: {stage.what}\n$ octjepa {' '.join(stage.args)}", flush=True)
    log_path = logs / f"{stage.name}.log"
    start = time.monotonic()
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=str(logs.parent)
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            print(f"  {stage.name:>10} | {line}", end="", flush=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise StageError(
            f"demo stage {stage.name!r} failed with exit code {proc.returncode} after {seconds:.0f} s\n"
            f"  command: {' '.join(command)}\n  log: {log_path}"
        )
    print(f"=== {stage.name} done in {seconds:.0f} s", flush=True)
    return seconds


def summary(out: dict[str, Path], timings: dict[str, float], report: dict | None = None) -> str:
    """What was made and where, the dead letters, the probe table and the goals."""
    from trainer.demo_report import format_goals
    from trainer.probe import format_table

    lines = [
        "",
        "=" * 78,
        "octjepa demo: done",
        "",
        "stage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {sum(timings.values()):.0f}",
        "",
        "outputs:",
    ]
    for name, path in out.items():
        lines.append(f"  {name:<17} {path}{'' if path.exists() else '   (missing!)'}")
    index_path = out["shards"] / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        lines += [
            "",
            (
                f"shards: {index['counts']['by_split']} by split, {index['counts']['by_device']} by device; "
                f"{index['errors']['count']} input(s) routed to errors.jsonl: {index['errors']['by_reason']}"
            ),
        ]
    if report is not None:
        cv = report["cv"]
        lines += [
            "",
            f"probes: mean [95% interval] over {cv['repeats']} x {cv['folds']}-fold CV by participant "
            "(paired differences over the same folds):",
            format_table(report["probes"]),
            "",
            format_goals(report),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="octjepa demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="demo_workdir", help="everything the demo writes goes here")
    parser.add_argument("--reduced", action="store_true", help=f"the CI setting: {REDUCED}")
    parser.add_argument("--participants", type=int, default=None)
    parser.add_argument("--scale", type=float, default=None, help="synthetic grid scale per axis")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--config", default=str(SMOKE_CONFIG), help="train config (default: configs/smoke.yaml)")
    args = parser.parse_args(argv)

    base = REDUCED if args.reduced else DemoSettings()
    settings = DemoSettings(
        **{
            k: getattr(args, k) if getattr(args, k) is not None else getattr(base, k)
            for k in ("participants", "scale", "steps", "seed")
        },
        batch_size=base.batch_size,
        repeats=base.repeats,
    )
    config = Path(args.config).resolve()
    if not config.exists():
        raise FileNotFoundError(f"--config {config}: no such train config")
    from trainer.config import load_train_config

    train_cfg = load_train_config(str(config), [])
    input_shape = tuple(train_cfg.model.encoder.input_shape)
    work = Path(args.workdir).resolve()
    stages, out = plan(work, settings, config, input_shape, train_cfg.checkpoint.export_encoder)
    # A fresh run: only the demo's own outputs are removed, never anything else in the workdir.
    for name in ("dataset", "shards", "shards_by_device", "run", "logs"):
        shutil.rmtree(out[name], ignore_errors=True)
    for name in (
        "probe_report",
        "probe_plot",
        "embeddings",
        "embeddings_tsv",
        "preview",
        "preview_masks",
        "report",
        "report_png",
    ):
        out[name].unlink(missing_ok=True)
    out["logs"].mkdir(parents=True)
    print(f"octjepa demo in {work}: {settings}")
    timings: dict[str, float] = {}
    for number, stage in enumerate(stages, start=1):
        try:
            timings[stage.name] = run_stage(number, len(stages), stage, out["logs"])
        except StageError as exc:
            print(f"\n{exc}", file=sys.stderr)
            return 1
    from dataclasses import asdict

    from trainer.demo_report import write_report

    report = write_report(
        out,
        settings=asdict(settings),
        timings=timings,
        anatomy=probe_targets()[1:],
        embed_dim=train_cfg.model.encoder.embed_dim,
    )
    print(summary(out, timings, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
