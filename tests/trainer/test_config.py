"""The run configuration is typed and closed, and the presets hold the seed's settings and their launch command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import octjepa_cli
from shards.typed_config import ConfigError, from_dict, to_dict
from trainer.config import TrainConfig, load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEVICES = ["heidelberg_spectralis", "topcon_maestro2", "topcon_triton", "zeiss_cirrus"]


@pytest.mark.parametrize(
    "name, epochs, weights",
    [
        ("pretrain_vjepa_single_domain", 120, None),
        ("pretrain_vjepa_multi_domain", 150, DEVICES),
    ],
)
def test_pretrain_presets_hold_the_seed_settings(name: str, epochs: int, weights: list[str] | None) -> None:
    path = CONFIGS / f"{name}.yaml"
    cfg = load_train_config(str(path))
    enc = cfg.model.encoder
    assert (enc.size, enc.embed_dim, enc.depth) == ("base", 768, 12)
    assert enc.patch_size == (4, 16, 16) and enc.input_shape == (64, 384, 384) == cfg.data.crop_shape
    assert cfg.global_batch_size == 128 and cfg.epochs == epochs and cfg.max_steps == 0
    assert cfg.optim.lr == 1.5e-3 and cfg.optim.weight_decay == 0.05 == cfg.optim.final_weight_decay
    # The EMA follows the run's length (issue 14): its horizon 1% -> 10% of the steps, the target exported.
    assert (cfg.optim.ema_schedule, cfg.optim.ema_horizon_start, cfg.optim.ema_horizon_end) == ("horizon", 0.01, 0.1)
    assert cfg.checkpoint.export_encoder == "target"
    if weights is None:  # one domain: the topcon_triton set, nothing to balance
        assert "topcon_triton" in cfg.data.shards and cfg.data.domain_weights == {}
    else:
        assert sorted(cfg.data.domain_weights) == weights and len(set(cfg.data.domain_weights.values())) == 1
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = " ".join(comments)
    assert "octjepa launch-tpu" in launch and f"--config configs/{name}.yaml" in launch


def test_smoke_preset_is_tiny_and_on_the_cpu() -> None:
    cfg = load_train_config(str(CONFIGS / "smoke.yaml"))
    assert cfg.device == "cpu" and cfg.model.encoder.size == "tiny"
    assert cfg.model.encoder.input_shape == cfg.data.crop_shape
    assert cfg.max_steps > 0 and cfg.logging.wandb == "disabled"
    assert "octjepa train --config configs/smoke.yaml" in (CONFIGS / "smoke.yaml").read_text()


def test_overrides_are_typed_and_keep_the_file_siblings() -> None:
    cfg = load_train_config(
        str(CONFIGS / "smoke.yaml"),
        ["optim.lr=0.0003", "model.encoder.patch_size=[2,8,8]", "data.domain_weights={a: 1, b: 0.5}"],
    )
    assert cfg.optim.lr == 0.0003 and cfg.optim.start_lr == 1.0e-4  # sibling from the file kept
    assert cfg.model.encoder.patch_size == (2, 8, 8) and cfg.data.domain_weights == {"a": 1.0, "b": 0.5}


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1e-3", "lrr"),  # unknown nested key
        ("learning_rate=1e-3", "learning_rate"),  # unknown top-level key
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("grad_accum=1.5", "grad_accum"),
        ("logging.wandb=maybe", "logging.wandb"),  # not one of the choices
        ("model.encoder.sise=base", "sise"),
        ("grad_accum=3", "grad_accum"),  # 4 samples do not split into 3 micro-batches
        ("data.crop_shape=[8,32,32]", "crop_shape"),  # the encoder would not see the loader's crops
    ],
)
def test_bad_keys_and_values_are_errors_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_train_config(str(CONFIGS / "smoke.yaml"), [override])


def test_an_unknown_key_in_a_file_fails_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    data["optim"]["mpl_ratio"] = 4.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert octjepa_cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "optim" in err and "mpl_ratio" in err


def test_resolved_config_round_trips() -> None:
    cfg = load_train_config(str(CONFIGS / "pretrain_vjepa_multi_domain.yaml"))
    again = from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_per_host_batch() -> None:
    cfg = load_train_config(str(CONFIGS / "pretrain_vjepa_multi_domain.yaml"), ["grad_accum=2"])
    assert cfg.host_batch_size(8) == 8  # 128 / 2 micro-batches / 8 hosts
    with pytest.raises(ConfigError, match="hosts 3"):
        cfg.host_batch_size(3)


def test_each_host_checks_that_its_devices_divide_its_share_of_the_batch() -> None:
    cfg = load_train_config(str(CONFIGS / "pretrain_vjepa_multi_domain.yaml"), ["global_batch_size=32"])
    assert cfg.host_batch_size(4, local_devices=4) == 8  # e.g. a v4-32: 4 hosts of 4 chips, 2 samples per chip
    with pytest.raises(ConfigError, match="8 samples per host must be divisible by this host's 3 local devices"):
        cfg.host_batch_size(4, local_devices=3)
    assert cfg.sharding == "replicated"
    with pytest.raises(ConfigError, match="sharding"):
        load_train_config(str(CONFIGS / "pretrain_vjepa_multi_domain.yaml"), ["sharding=zero3"])
