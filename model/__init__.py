"""3D V-JEPA 2 for OCT volumes: encoder, predictor, static-shape multi-block masks, loss and EMA target.

torch only: no data code, and torch_xla only inside the optional TPU flash-attention path.
"""

from model.attention import Attention, Block, attention
from model.config import (
    ATTN_IMPLS,
    POS_EMBEDS,
    SIZES,
    EncoderConfig,
    MaskBlockConfig,
    MaskConfig,
    ModelConfig,
    PredictorConfig,
)
from model.jepa import VJEPA, feature_std, momentum_schedule
from model.masks import MultiBlockMasks, block_shapes, block_union, to_volume_mask
from model.param_groups import no_weight_decay_names, param_groups
from model.predictor import Predictor
from model.rope import RotaryCache, rope_angles, sincos_table_3d
from model.vit import VisionTransformer3D, gather_tokens

__all__ = [
    "ATTN_IMPLS",
    "POS_EMBEDS",
    "SIZES",
    "VJEPA",
    "Attention",
    "Block",
    "EncoderConfig",
    "MaskBlockConfig",
    "MaskConfig",
    "ModelConfig",
    "MultiBlockMasks",
    "Predictor",
    "PredictorConfig",
    "RotaryCache",
    "VisionTransformer3D",
    "attention",
    "block_shapes",
    "block_union",
    "feature_std",
    "gather_tokens",
    "momentum_schedule",
    "no_weight_decay_names",
    "param_groups",
    "rope_angles",
    "sincos_table_3d",
    "to_volume_mask",
]
