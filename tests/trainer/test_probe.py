"""The frozen-encoder probe: its statistics on planted signals, the label join, and the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import embed, probe


def planted(n: int = 450, dim: int = 16, classes: int = 3, seed: int = 0):
    """Features with a linear class signal: y = argmax(x @ W); random splits and devices."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = np.array([f"group{k}" for k in range(classes)])[(x @ rng.normal(size=(dim, classes))).argmax(1)]
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    devices = rng.choice(["topcon_triton", "zeiss_cirrus"], size=n)
    return x, y, splits, devices, rng


def test_linear_probe_recovers_a_planted_signal_and_sits_at_chance_on_shuffled_labels():
    x, y, splits, devices, rng = planted()
    signal = probe.run_probe(x, y, splits, devices)
    shuffled = probe.run_probe(x, rng.permutation(y), splits, devices)
    assert signal["eval_split"] == "test" and signal["n"] == int((splits == "test").sum())
    assert signal["balanced_accuracy"] > 0.85 and signal["auroc_macro_ovr"] > 0.95
    assert abs(shuffled["balanced_accuracy"] - 1 / 3) < 0.15
    assert abs(shuffled["auroc_macro_ovr"] - 0.5) < 0.15
    assert signal["selection"]["selected_on"] == "val"
    # The breakdowns partition the eval split.
    assert sum(d["n"] for d in signal["per_device"].values()) == signal["n"]
    assert sum(c["support"] for c in signal["per_class"].values()) == signal["n"]
    assert np.asarray(signal["confusion_matrix"]).sum() == signal["n"]


def test_probe_reports_on_val_without_a_test_split_and_refuses_without_train():
    x, y, splits, devices, _ = planted(n=200)
    splits = np.where(splits == "test", "val", splits)
    result = probe.run_probe(x, y, splits, devices)
    assert result["eval_split"] == "val" and result["n"] == int((splits == "val").sum())
    with pytest.raises(ValueError, match="train split"):
        probe.run_probe(x, y, np.full(len(y), "val"), devices)


def test_auroc_skips_classes_absent_from_the_eval_split():
    y_true = np.array(["a", "a", "b", "b"])  # class "c" is known to the probe but absent here
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    value, left_out = probe.macro_auroc(y_true, proba, np.array(["a", "b", "c"]))
    assert value == pytest.approx(1.0) and left_out == ["c"]
    value, left_out = probe.macro_auroc(np.array(["a", "a"]), proba[:2], np.array(["a", "b", "c"]))
    assert value is None and left_out == ["a", "b", "c"]


def write_labels(path, rows, header=("participant_id", "clinical_site", "study_group", "age", "recommended_split")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def test_join_counts_missing_and_extra_participants_and_takes_the_labels_split(tmp_path):
    path = write_labels(tmp_path / "participants.tsv", [
        ("1001", "UW", "healthy", "60", "train"),
        ("1002", "UAB", "pre_diabetes", "55", "test"),
        ("1003", "UCSD", "", "70", "train"),          # empty label: counts as missing
        ("1004", "UW", "healthy", "61", "holdout"),   # unknown split value: falls back to the shard set's split
        ("9999", "UW", "insulin", "40", "val"),       # labelled participant without volumes
    ])
    labels = probe.read_labels(path, label_column="study_group", split_column="recommended_split")
    pids = ["1001", "1001", "1002", "1003", "1004", "2000"]
    sample_splits = ["val", "val", "train", "train", "val", "train"]
    joined = probe.join_labels(pids, sample_splits, labels)
    assert joined.rows.tolist() == [0, 1, 2, 4]
    assert joined.labels == ["healthy", "healthy", "pre_diabetes", "healthy"]
    assert joined.splits == ["train", "train", "test", "val"]
    assert joined.counts == {
        "volumes": 6, "labelled_volumes": 4, "skipped_volumes_without_label": 2,
        "participants_without_label": 2, "labelled_participants_without_volumes": 1,
        "split_from_labels": 3, "split_from_shards": 1,
    }
    # Without the split column every split comes from the shard set.
    labels = probe.read_labels(path, label_column="study_group", split_column="no_such_column")
    assert probe.join_labels(pids, sample_splits, labels).splits == ["val", "val", "train", "val"]


def test_labels_file_errors_name_the_problem(tmp_path):
    path = write_labels(tmp_path / "p.tsv", [("1001", "UW", "healthy", "60", "train")])
    with pytest.raises(ValueError, match="no column 'diagnosis'"):
        probe.read_labels(path, label_column="diagnosis", split_column=None)
    path = write_labels(tmp_path / "q.tsv", [("1001", "UW", "healthy", "60", "train"),
                                              ("1001", "UW", "insulin", "60", "train")])
    with pytest.raises(ValueError, match="two labels"):
        probe.read_labels(path, label_column="study_group", split_column=None)


def test_random_init_encoder_is_reproducible_and_seed_dependent():
    import torch

    from model import EncoderConfig

    cfg = EncoderConfig(size="tiny", patch_size=(4, 16, 16), input_shape=(8, 32, 32))
    a, b, c = (embed.random_init_encoder(cfg, s) for s in (0, 0, 1))
    wa, wb, wc = (m.patch_embed.proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_attentive_probe_learns_a_planted_signal():
    rng = np.random.default_rng(0)
    n, tokens, dim = 120, 4, 8
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, tokens, dim)).astype(np.float16)
    x[:, :, 0] += np.where(y == 1, 1.0, -1.0)[:, None]  # the class shifts every token's first feature
    splits = np.array(["train"] * 70 + ["val"] * 25 + ["test"] * 25)
    result = probe.run_probe(x, np.array(["no", "yes"])[y], splits, np.full(n, "zeiss_cirrus"), attentive=True)
    assert result["balanced_accuracy"] > 0.8


def export_tiny_encoder(path: str) -> None:
    """A (briefly initialised, untrained) tiny V-JEPA's target encoder, exported as the trainer does."""
    from model import VJEPA
    from trainer.checkpoint import export_encoder
    from trainer.config import load_train_config

    cfg = load_train_config(None, ["model.encoder.size=tiny", "model.encoder.input_shape=[8,32,32]",
                                   "model.encoder.patch_size=[4,16,16]", "data.crop_shape=[8,32,32]",
                                   "model.predictor.depth=1", "model.predictor.embed_dim=32",
                                   "model.predictor.num_heads=2"])
    export_encoder(path, VJEPA(cfg.model), cfg)


def test_probe_and_embed_commands_end_to_end(tmp_path, capsys):
    from tests.trainer.shardset_fixture import make_shard_set

    shards_root = str(tmp_path / "set")
    index = make_shard_set(shards_root, n_train=24, n_val=8, shape=(8, 32, 32))
    checkpoint = str(tmp_path / "encoder.pt")
    export_tiny_encoder(checkpoint)
    # Participants 1000..1023 hold volumes; 1020..1023 have no label, 5555 has a label and no volume.
    splits = {p: "train" if p < 1014 else "val" if p < 1017 else "test" for p in range(1000, 1020)}
    rows = [(str(p), "UW", "ab"[p % 2], "50", split) for p, split in splits.items()]
    labels = write_labels(tmp_path / "participants.tsv", rows + [("5555", "UW", "a", "50", "test")])
    out = tmp_path / "report"
    assert probe.main_probe(["--checkpoint", checkpoint, "--shards", shards_root, "--labels", labels,
                             "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["join"]["volumes"] == 32 and report["join"]["skipped_volumes_without_label"] == 4
    assert report["join"]["labelled_participants_without_volumes"] == 1
    assert set(report["encoders"]) == {"pretrained", "random_init"}
    for result in report["encoders"].values():
        assert result["eval_split"] == "test" and result["n"] == 3  # participants 1017..1019, one volume each
        assert set(result["per_device"]) <= set(index["counts"]["by_device"])
    assert (out / "confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "balanced_accuracy" in printed and "random_init" in printed and "4 skipped" in printed

    emb_out = str(tmp_path / "emb" / "embeddings.npz")
    assert embed.main_embed(["--checkpoint", checkpoint, "--shards", shards_root, "--out", emb_out]) == 0
    table = np.load(emb_out)
    assert table["embedding"].shape == (32, 192) and np.isfinite(table["embedding"]).all()
    assert len(set(table["key"].tolist())) == 32 and set(table["split"].tolist()) == {"train", "val"}
    tsv = (tmp_path / "emb" / "embeddings.tsv").read_text().splitlines()
    assert len(tsv) == 33 and tsv[0].startswith("key\tparticipant_id\tdevice\tsplit\te0")
