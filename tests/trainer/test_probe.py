"""The frozen-encoder probe: targets joined per volume or per participant, probes on features with a planted
answer (a real difference is found, a null one is not), the attentive probe, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.trainer.shardset_fixture import SMALL_PREDICTOR
from trainer import embed, probe
from trainer.probe_stats import CVPlan, cross_validate, summary

PLAN = CVPlan(folds=5, repeats=3)


def write_table(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_a_per_volume_table_joins_on_the_volume_and_a_per_participant_one_on_the_participant(tmp_path):
    pids = ["1001", "1001", "1002", "1003"]
    uids = ["1.1", "1.2", "2.1", "3.1"]
    volumes = write_table(
        tmp_path / "anatomy.tsv",
        ("participant_id", "sop_instance_uid", "thickness", "group"),
        [
            ("1001", "1.1", "0.30", "a"),
            ("1001", "1.2", "0.32", "a"),
            ("1002", "2.1", "", "b"),
            ("1003", "3.1", "0.28", "b"),
            ("9999", "9.9", "0.5", "c"),
        ],
    )
    table = probe.read_labels(volumes, targets=["thickness", "group"])
    assert table.key_column == "sop_instance_uid"
    t = probe.join_target("thickness", table, pids, uids)
    assert t.task == "regression" and t.rows.tolist() == [0, 1, 3] and t.y.tolist() == [0.30, 0.32, 0.28]
    assert t.groups.tolist() == ["1001", "1001", "1003"]  # the folds still split participants, not volumes
    assert t.counts == {
        "volumes": 4,
        "labelled_volumes": 3,
        "volumes_without_value": 1,
        "participants": 2,
        "table_keys_without_volumes": 1,
    }
    people = write_table(
        tmp_path / "participants.tsv",
        ("participant_id", "study_group", "age"),
        [("1001", "healthy", "61"), ("1003", "insulin_dependent", "70"), ("1002", "healthy", "52")],
    )
    table = probe.read_labels(people, targets=["study_group", "age"])
    g = probe.join_target("study_group", table, pids, uids)
    assert table.key_column == "participant_id" and g.task == "classification"
    assert g.y.tolist() == ["healthy", "healthy", "healthy", "insulin_dependent"]
    assert probe.join_target("age", table, pids, uids).task == "regression"


def test_label_table_errors_name_the_problem(tmp_path):
    path = write_table(tmp_path / "p.tsv", ("participant_id", "study_group"), [("1001", "healthy")])
    with pytest.raises(ValueError, match="no column 'diagnosis'"):
        probe.read_labels(path, targets=["diagnosis"])
    path = write_table(
        tmp_path / "q.tsv", ("participant_id", "study_group"), [("1001", "healthy"), ("1001", "insulin")]
    )
    with pytest.raises(ValueError, match="two 'study_group' values"):
        probe.read_labels(path, targets=["study_group"])


def test_task_is_regression_for_numbers_and_classification_otherwise():
    assert probe.task_of(["0.1", "0.5", "2"]) == "regression"
    assert probe.task_of(["0", "1", "1"]) == "classification"  # two values: a binary label
    assert probe.task_of(["healthy", "3"]) == "classification"


def planted_target(n_people=50, seed=0):
    """A per-participant target, two volumes each; a 'pretrained' feature set that carries it, and baselines that
    do not (so the paired difference is real), or a second copy of noise (so it is null)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_people)], 2)
    y = np.repeat(rng.normal(size=n_people), 2)
    n = len(y)
    pretrained = rng.normal(size=(n, 12))
    pretrained[:, 0] = y + 0.5 * rng.normal(size=n)
    target = probe.Target(
        "thickness", "regression", np.arange(n), y, groups, {"labelled_volumes": n, "participants": n_people}
    )
    return target, pretrained, rng


def test_probe_target_finds_a_planted_difference_and_no_null_one():
    target, pretrained, rng = planted_target()
    noise = {name: rng.normal(size=pretrained.shape) for name in ("online", probe.RANDOM, probe.RAW)}
    out = probe.probe_target(target, {"target": pretrained, **noise}, PLAN)
    diff = out["paired_difference"]
    assert diff["encoder"] == "target" and diff["baseline"] == probe.RANDOM and diff["metric"] == "r2"
    assert diff["interval_above_zero"] and diff["ci95"][0] > 0.3 and len(diff["folds"]) == 15
    null = out["paired_differences"]["online - random_init"]["r2"]
    assert null["ci95"][0] < 0 < null["ci95"][1]
    assert set(out["paired_differences"]) == {
        "target - random_init",
        "target - raw_voxels",
        "online - random_init",
        "online - raw_voxels",
    }
    # The same folds for every feature set: an encoder compared with itself differs by exactly zero.
    same = probe.probe_target(target, {"target": pretrained, probe.RANDOM: pretrained}, PLAN)["paired_difference"]
    assert same["mean"] == 0.0 and not same["interval_above_zero"]
    text = probe.format_table({"thickness": out})
    assert "target - random_init" in text and "[" in text


def test_random_init_encoder_is_reproducible_and_seed_dependent():
    import torch

    from model import EncoderConfig

    cfg = EncoderConfig(size="tiny", patch_size=(4, 16, 16), input_shape=(8, 32, 32))
    a, b, c = (embed.random_init_encoder(cfg, s) for s in (0, 0, 1))
    wa, wb, wc = (m.patch_embed.proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_attentive_probe_learns_a_planted_signal(monkeypatch):
    from trainer import probe_stats

    monkeypatch.setattr(probe_stats, "ATTENTIVE_WD_GRID", (1e-2,))  # one weight decay: a third of the fits
    rng = np.random.default_rng(0)
    n, tokens, dim = 80, 4, 8
    groups = np.repeat([f"p{i}" for i in range(n // 2)], 2)
    y = np.repeat(rng.integers(0, 2, size=n // 2), 2)
    x = rng.normal(size=(n, tokens, dim)).astype(np.float16)
    x[:, :, 0] += np.where(y == 1, 1.0, -1.0)[:, None]  # the class shifts every token's first feature
    plan = CVPlan(folds=4, repeats=1, inner_folds=2)
    scores = cross_validate(x, np.array(["no", "yes"])[y], groups, task="classification", plan=plan)
    assert summary(scores["balanced_accuracy"], plan)["mean"] > 0.8


def export_tiny_encoder(path: str) -> None:
    """A (briefly initialised, untrained) tiny V-JEPA's target encoder, exported as the trainer does."""
    from model import VJEPA
    from trainer.checkpoint import export_encoder
    from trainer.config import load_train_config

    cfg = load_train_config(
        None,
        [
            "model.encoder.size=tiny",
            "model.encoder.input_shape=[8,32,32]",
            "model.encoder.patch_size=[4,16,16]",
            "data.crop_shape=[8,32,32]",
            *SMALL_PREDICTOR,
        ],
    )
    export_encoder(path, VJEPA(cfg.model), cfg)


def test_probe_and_embed_commands_end_to_end(tmp_path, capsys):
    from tests.trainer.shardset_fixture import make_shard_set

    shards_root = str(tmp_path / "set")
    make_shard_set(shards_root, n_train=24, n_val=8, shape=(8, 32, 32))
    checkpoint = str(tmp_path / "encoder.pt")
    export_tiny_encoder(checkpoint)
    # Participants 1000..1023 hold the 24 train volumes, 1000..1007 also the 8 val ones; 1020..1023 have no label,
    # 5555 has a label and no volume. A volume's level is its number + 20 (participant - 1000 + 20): "level" is a
    # known answer the raw voxels see; "group" splits the participants in two.
    rows = [(str(p), "ab"[p % 2], p - 1000) for p in range(1000, 1020)]
    labels = write_table(tmp_path / "participants.tsv", ("participant_id", "group", "level"), rows + [("5555", "a", 3)])
    out = tmp_path / "report"
    assert (
        probe.main_probe(
            [
                "--checkpoint",
                checkpoint,
                "--shards",
                shards_root,
                "--labels",
                labels,
                "--targets",
                "group,level",
                "--folds",
                "3",
                "--repeats",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["feature_sets"] == ["pretrained", "random_init", "raw_voxels"]
    group, level = report["probes"]["group"], report["probes"]["level"]
    assert group["task"] == "classification" and level["task"] == "regression"
    assert group["counts"]["labelled_volumes"] == 28 and group["counts"]["volumes_without_value"] == 4
    assert group["counts"]["table_keys_without_volumes"] == 1
    assert len(level["paired_difference"]["ci95"]) == 2 and level["paired_difference"]["encoder"] == "pretrained"
    assert set(group["scores"]["random_init"]) == {"balanced_accuracy", "auroc_macro_ovr"}
    assert (out / "probe.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "pretrained - random_init" in printed and "level (regression, r2" in printed

    emb_out = str(tmp_path / "emb" / "embeddings.npz")
    assert embed.main_embed(["--checkpoint", checkpoint, "--shards", shards_root, "--out", emb_out]) == 0
    table = np.load(emb_out)
    assert table["embedding"].shape == (32, 192) and np.isfinite(table["embedding"]).all()
    assert len(set(table["key"].tolist())) == 32 and set(table["split"].tolist()) == {"train", "val"}
    tsv = (tmp_path / "emb" / "embeddings.tsv").read_text().splitlines()
    assert len(tsv) == 33 and tsv[0].startswith("key\tparticipant_id\tdevice\tsplit\tsop_instance_uid\te0")
