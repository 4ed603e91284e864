"""The demo's evidence in one place: ``report.json`` and ``report.png`` from the run's metrics and the probe report.

``report.json``: the settings and stage times, the probe report's ``probes`` (every target's scores per feature
set and the paired differences, with 95% intervals: ``probes.<target>.paired_difference.ci95``), the training's
last validation (val loss over every val volume, lookup baseline, effective ranks) and the issue's two goals with
the numbers they were judged on: on at least two anatomy targets the exported encoder's paired difference over
random init has an interval above 0, and the final effective rank of the target features stays above a quarter of
the encoder width. ``report.png``: the loss curves with the lookup baseline, the effective ranks with that floor,
and the paired differences per target.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.monitor import plot_training, read_metrics

MIN_TARGETS_ABOVE_ZERO = 2
RANK_FLOOR_SHARE = 0.25


def goals(
    probes: dict[str, dict[str, Any]], anatomy: Sequence[str], last_val: dict[str, Any], embed_dim: int
) -> dict[str, Any]:
    """The two goals and the numbers behind them."""
    above = [t for t in anatomy if t in probes and probes[t].get("paired_difference", {}).get("interval_above_zero")]
    floor = RANK_FLOOR_SHARE * embed_dim
    rank = last_val.get("rank_target")
    return {
        "anatomy_targets": list(anatomy),
        "anatomy_targets_interval_above_zero": above,
        "anatomy_goal_met": len(above) >= MIN_TARGETS_ABOVE_ZERO,
        "final_rank_target": rank,
        "rank_floor": floor,
        "rank_goal_met": rank is not None and rank > floor,
    }


def plot_report(path: Path, records: list[dict], probes: dict[str, dict[str, Any]], rank_floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.2 + 0.45 * len(probes)))
    grid = fig.add_gridspec(2, 2, height_ratios=(4.0, 1.0 + 0.45 * len(probes)))
    plot_training(
        [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])],
        records,
        rank_floor=(rank_floor, f"goal: a quarter of the encoder width ({rank_floor:g})"),
    )
    ax = fig.add_subplot(grid[1, :])
    rows = []
    for target, p in probes.items():
        for pair, by_metric in p.get("paired_differences", {}).items():
            if pair.endswith("random_init"):
                rows.append((f"{target}: {pair} ({p['metric']})", by_metric[p["metric"]]))
    for i, (_, s) in enumerate(rows):
        if s["mean"] is None or s["ci95"] is None:
            continue
        lo, hi = s["ci95"]
        ax.errorbar(
            s["mean"],
            i,
            xerr=[[s["mean"] - lo], [hi - s["mean"]]],
            fmt="o",
            capsize=3,
            color="tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:blue",
        )
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference over the same CV folds, mean and 95% interval (green: interval above 0)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out: dict[str, Path], *, settings: dict[str, Any], timings: dict[str, float], anatomy: Sequence[str], embed_dim: int
) -> dict[str, Any]:
    """Write ``out["report"]`` (JSON) and ``out["report_png"]``; returns the report."""
    records = read_metrics(str(out["run"] / "metrics.jsonl"))
    val = [r for r in records if r.get("split") == "val"]
    last_val = val[-1] if val else {}
    probe_report = json.loads(out["probe_report"].read_text())
    probes = probe_report["probes"]
    report = {
        "settings": settings,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paired_difference_ci95": {
            t: p["paired_difference"]["ci95"] for t, p in probes.items() if "paired_difference" in p
        },
        "goals": goals(probes, anatomy, last_val, embed_dim),
        "training": {"encoder_width": embed_dim, "last_val": last_val, "val_history": val},
        "cv": probe_report["cv"],
        "probes": probes,
    }
    out["report"].write_text(json.dumps(report, indent=1))
    plot_report(out["report_png"], records, probes, RANK_FLOOR_SHARE * embed_dim)
    return report


def format_goals(report: dict[str, Any]) -> str:
    g = report["goals"]
    above = ", ".join(g["anatomy_targets_interval_above_zero"]) or "none"
    rank = "n/a" if g["final_rank_target"] is None else f"{g['final_rank_target']:.1f}"
    return "\n".join(
        [
            f"goal 1 ({'met' if g['anatomy_goal_met'] else 'NOT met'}): anatomy targets whose paired difference "
            f"(exported encoder - random init) has a 95% interval above 0: {above}",
            f"goal 2 ({'met' if g['rank_goal_met'] else 'NOT met'}): final effective rank of the target features "
            f"{rank} vs a quarter of the encoder width {g['rank_floor']:g}",
        ]
    )
