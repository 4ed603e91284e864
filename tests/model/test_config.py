import pytest

from model import (
    SIZES,
    EncoderConfig,
    MaskBlockConfig,
    MaskConfig,
    ModelConfig,
    PredictorConfig,
)
from shards.typed_config import from_dict, to_dict


def test_size_table_drives_width_depth_heads():
    assert SIZES == {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    cfg = EncoderConfig(size="large")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (1024, 24, 16)
    assert EncoderConfig().grid == (16, 24, 24)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"size": "huge"}, "encoder.size"),
        ({"input_shape": (64, 384, 380)}, "divisible"),
        ({"patch_size": (4, 16)}, "encoder.patch_size"),
        ({"pos_embed": "learned"}, "encoder.pos_embed"),
        ({"attn_impl": "flash"}, "encoder.attn_impl"),
        ({"drop_path": 1.0}, "encoder.drop_path"),
    ],
)
def test_encoder_config_rejects_bad_values_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EncoderConfig(**kwargs)


def test_other_configs_reject_bad_values():
    with pytest.raises(ValueError, match="predictor.embed_dim"):
        PredictorConfig(embed_dim=100, num_heads=12)
    with pytest.raises(ValueError, match="spatial_scale"):
        MaskBlockConfig(4, 1.5)
    with pytest.raises(ValueError, match="aspect_ratio"):
        MaskBlockConfig(4, 0.2, aspect_ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        MaskConfig(blocks=())


def test_defaults_are_vjepa2_not_the_seed():
    cfg = ModelConfig()
    assert (cfg.predictor.depth, cfg.predictor.embed_dim) == (12, 384)
    assert [(b.num_blocks, b.spatial_scale) for b in cfg.masks.blocks] == [(8, 0.15), (2, 0.70)]
    assert cfg.encoder.pos_embed == "rope" and cfg.encoder.patch_size == (4, 16, 16)


def test_round_trips_through_typed_config_and_rejects_unknown_keys():
    cfg = ModelConfig(encoder=EncoderConfig(size="small", input_shape=(64, 128, 128)))
    data = to_dict(cfg)
    assert from_dict(ModelConfig, data) == cfg
    data["encoder"]["mpl_ratio"] = 4.0
    with pytest.raises(ValueError, match="mpl_ratio"):
        from_dict(ModelConfig, data)
    with pytest.raises(ValueError, match="divisible"):
        from_dict(ModelConfig, {"encoder": {"input_shape": [64, 100, 128]}})


def test_explicit_width_depth_heads_override_the_size_row_and_round_trip():
    cfg = EncoderConfig(size="tiny", embed_dim=48, depth=2)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (48, 2, 3)  # heads: still the row's
    assert from_dict(EncoderConfig, to_dict(cfg)) == cfg
    assert to_dict(cfg)["embed_dim"] == 48  # a saved config records the width it was built with
    # Heads of 5 channels are too narrow for 3D RoPE (below), not for the sin-cos table, which needs the width.
    assert EncoderConfig(embed_dim=20, num_heads=4, pos_embed="sincos").embed_dim == 20


def test_a_config_saved_with_only_the_size_builds_the_size_row():
    """Configs saved before embed_dim, depth and num_heads were keys hold `size` alone."""
    old = from_dict(EncoderConfig, {"size": "small", "input_shape": [64, 128, 128]})
    assert (old.embed_dim, old.depth, old.num_heads) == SIZES["small"]
    assert old == EncoderConfig(size="small", input_shape=(64, 128, 128), embed_dim=384, depth=12, num_heads=6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"embed_dim": 0}, "encoder.embed_dim must be a positive int"),
        ({"depth": -1}, "encoder.depth must be a positive int"),
        ({"num_heads": 2.0}, "encoder.num_heads must be a positive int"),
        ({"embed_dim": 100, "num_heads": 12}, "divisible by encoder.num_heads"),
        ({"embed_dim": 20, "num_heads": 4}, "head_dim 5 is too small for 3D rotary"),  # RoPE: >= 6 per head
        ({"embed_dim": 9, "num_heads": 1, "pos_embed": "sincos"}, "even and >= 6 for a 3D sin-cos"),
    ],
)
def test_explicit_width_is_checked_for_the_blocks_and_the_position_embedding(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EncoderConfig(**kwargs)
