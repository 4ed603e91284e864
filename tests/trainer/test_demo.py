"""The README's first command, end to end on the reduced setting, and what a failing stage reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import demo


def test_demo_runs_end_to_end_on_the_reduced_setting(tmp_path, capsys):
    work = tmp_path / "demo"
    assert demo.main(["--workdir", str(work), "--reduced"]) == 0
    printed = capsys.readouterr().out
    _, out = demo.plan(work.resolve(), demo.REDUCED, demo.SMOKE_CONFIG, (16, 64, 64))
    for name, path in out.items():
        assert path.exists(), f"demo output {name} missing at {path}"
        assert str(path) in printed, f"demo did not print where {name} is"
    # Every stage ran, in order, under its header, and its log was kept.
    headers = [line.split("] ")[1].split(":")[0] for line in printed.splitlines() if line.startswith("=== [")]
    assert headers == ["synth", "preprocess", "reshard", "verify", "train", "probe", "embed", "preview"]
    assert all((out["logs"] / f"{h}.log").stat().st_size > 0 for h in headers)
    # The broken files went to the dead letters, not into the shards; no good volume was lost.
    index = json.loads((out["shards"] / "index.json").read_text())
    assert index["errors"]["count"] > 0
    assert sum(1 for _ in out["errors"].read_text().splitlines()) == index["errors"]["count"]
    assert set(index["counts"]["by_device"]) == {
        "heidelberg_spectralis",
        "topcon_maestro2",
        "topcon_triton",
        "zeiss_cirrus",
    }
    # One shard set per device domain, together holding every sample.
    per_domain = sum(
        json.loads((out["shards_by_device"] / d / "index.json").read_text())["counts"]["by_device"][d]
        for d in index["counts"]["by_device"]
    )
    assert per_domain == sum(index["counts"]["by_split"].values())
    # The probes: every known answer of synth's anatomy table, the exported encoder first, both baselines.
    probe_report = json.loads(out["probe_report"].read_text())
    assert probe_report["feature_sets"] == ["target", "online", "random_init", "raw_voxels"]
    assert set(probe_report["probes"]) == set(demo.probe_targets())
    volumes = sum(index["counts"]["by_split"].values())
    assert all(p["counts"]["volumes"] == volumes for p in probe_report["probes"].values())
    probed = {t: p for t, p in probe_report["probes"].items() if "skipped" not in p}
    assert "inner_thinning" in probed  # 8 participants: some targets (one class, no cysts) may be skipped
    for p in probed.values():
        assert p["paired_difference"]["encoder"] == "target" and len(p["paired_difference"]["folds"]) == 5
    # The demo's report: the probes, the training diagnostics and the two goals, judged on their numbers.
    report = json.loads(out["report"].read_text())
    assert report["probes"] == probe_report["probes"]
    last = report["training"]["last_val"]
    assert {"loss", "lookup_loss", "rank_target", "rank_pred"} <= set(last)
    assert report["goals"]["rank_floor"] == 48 and report["goals"]["final_rank_target"] == last["rank_target"]
    assert "goal 1 (" in printed and "goal 2 (" in printed and "target - random_init" in printed


def test_a_failing_stage_is_named_with_its_exit_code_command_and_log(tmp_path):
    stage = demo.Stage("verify", "check a set that is not there", ["verify", str(tmp_path / "no_such_set")])
    with pytest.raises(demo.StageError, match=r"demo stage 'verify' failed with exit code [1-9]") as err:
        demo.run_stage(1, 1, stage, tmp_path)
    assert str(tmp_path / "verify.log") in str(err.value)
    assert Path(tmp_path / "verify.log").read_text()  # the child's own error message is kept
