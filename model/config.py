"""Typed, closed configuration of the 3D V-JEPA model: the one home for its defaults.

Plain dataclasses so `shards.typed_config.from_dict` can build them from YAML; every value is checked in
`__post_init__` and a bad one raises a ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.rope import rope_axis_dim, sincos_split

# embed_dim, depth, num_heads (V-JEPA 2's ViT table; a table, not subclasses).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
POS_EMBEDS = ("rope", "sincos")
ATTN_IMPLS = ("sdpa", "math", "xla_flash")


def _check_triple(name: str, value: tuple[int, ...]) -> None:
    if len(value) != 3 or any(int(v) != v or v <= 0 for v in value):
        raise ValueError(f"{name} must be three positive ints (D, H, W), got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class EncoderConfig:
    """The encoder's shape and options. Width, depth and heads come from the `size` row of SIZES unless given:
    an explicit `embed_dim`, `depth` or `num_heads` overrides that entry of the row. They are resolved here, so a
    saved config records the width it was built with, and one saved before these keys existed (only `size`)
    builds the same model. Since resolved values count as given, `dataclasses.replace(cfg, size=...)` keeps the
    old width: build a new config to change the size."""

    size: str = "base"
    embed_dim: int | None = None  # None: the size's
    depth: int | None = None  # None: the size's
    num_heads: int | None = None  # None: the size's
    patch_size: tuple[int, int, int] = (4, 16, 16)  # (B-scans, rows, columns) per tubelet
    input_shape: tuple[int, int, int] = (64, 384, 384)  # (D, H, W) of the volumes fed to the model
    mlp_ratio: float = 4.0
    pos_embed: str = "rope"  # "rope" (3D rotary) or "sincos" (fixed 3D table added to the patch embedding)
    attn_impl: str = "sdpa"  # "sdpa" | "math" | "xla_flash" (Pallas flash attention on TPU, SDPA elsewhere)
    activation_checkpointing: bool = False
    drop_path: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.input_shape = tuple(self.input_shape)
        if self.size not in SIZES:
            raise ValueError(f"encoder.size must be one of {sorted(SIZES)}, got {self.size!r}")
        _check_triple("encoder.patch_size", self.patch_size)
        _check_triple("encoder.input_shape", self.input_shape)
        if any(s % p for s, p in zip(self.input_shape, self.patch_size)):
            raise ValueError(
                f"encoder.input_shape {self.input_shape} must be divisible by encoder.patch_size {self.patch_size}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"encoder.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"encoder.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        self._resolve_width()
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"encoder.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in ("drop_path", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"encoder.{name} must be in [0, 1), got {getattr(self, name)}")

    def _resolve_width(self) -> None:
        """Fill embed_dim, depth and num_heads left None from the size's row, then check what the blocks and
        the position embedding need of them."""
        for name, preset in zip(("embed_dim", "depth", "num_heads"), SIZES[self.size]):
            if getattr(self, name) is None:
                setattr(self, name, preset)
            _check_positive_int(f"encoder.{name}", getattr(self, name))
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"encoder.embed_dim {self.embed_dim} must be divisible by encoder.num_heads {self.num_heads}"
            )
        try:
            if self.pos_embed == "rope":
                rope_axis_dim(self.embed_dim // self.num_heads)
            else:
                sincos_split(self.embed_dim)
        except ValueError as exc:
            raise ValueError(
                f"encoder.embed_dim {self.embed_dim} / encoder.num_heads {self.num_heads} "
                f"with pos_embed={self.pos_embed!r}: {exc}"
            ) from exc

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (d, h, w) = input_shape / patch_size."""
        return tuple(s // p for s, p in zip(self.input_shape, self.patch_size))


@dataclass
class PredictorConfig:
    depth: int = 12
    embed_dim: int = 384
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"predictor.{name} must be > 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"predictor.embed_dim {self.embed_dim} must be divisible by predictor.num_heads {self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"predictor.mlp_ratio must be > 0, got {self.mlp_ratio}")


@dataclass
class MaskBlockConfig:
    num_blocks: int
    spatial_scale: float  # area of one block as a fraction of the (h, w) = axial x lateral token plane
    aspect_ratio: tuple[float, float] = (0.75, 1.5)  # range of block height / width (rows / columns)

    def __post_init__(self) -> None:
        self.aspect_ratio = tuple(self.aspect_ratio)
        if self.num_blocks <= 0:
            raise ValueError(f"masks.blocks[].num_blocks must be > 0, got {self.num_blocks}")
        if not 0.0 < self.spatial_scale <= 1.0:
            raise ValueError(f"masks.blocks[].spatial_scale must be in (0, 1], got {self.spatial_scale}")
        lo_hi = self.aspect_ratio
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"masks.blocks[].aspect_ratio must be (min, max) with 0 < min <= max, got {lo_hi}")


@dataclass
class MaskConfig:
    blocks: tuple[MaskBlockConfig, ...] = (MaskBlockConfig(8, 0.15), MaskBlockConfig(2, 0.70))

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        if not self.blocks:
            raise ValueError("masks.blocks must hold at least one mask configuration")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
