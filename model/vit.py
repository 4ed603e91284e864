"""3D Vision Transformer over OCT volumes (B, 1, D, H, W), encoding all tokens or only a given subset."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import Block, init_vjepa_weights, run_blocks
from model.config import EncoderConfig
from model.rope import RotaryCache, rope_angles, sincos_table_3d


def gather_tokens(x: Tensor, token_idx: Tensor) -> Tensor:
    """x (B, N, E), token_idx (B, K) int64 -> (B, K, E)."""
    return torch.gather(x, 1, token_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: a Conv3d whose kernel equals its stride, (B, 1, D, H, W) -> (B, N, E) d-major."""

    def __init__(self, patch_size: tuple[int, int, int], embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # (B, E, d, h, w) -> (B, N, E), made contiguous once: a transposed layout would otherwise travel through
        # every residual add of the blocks and cost a copy in each LayerNorm.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class VisionTransformer3D(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.grid = cfg.grid
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.embed_dim)
        if cfg.pos_embed == "sincos":
            # Fixed, so a buffer (not trained, not averaged by the EMA); not saved, since it is rebuilt here.
            self.register_buffer("pos_table", sincos_table_3d(cfg.embed_dim, self.grid), persistent=False)
        else:
            self.pos_table = None
        # V-JEPA 2's linear decay rule; plain floats so a model can be built on the meta device.
        drop_paths = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.attn_impl, dp, cfg.dropout) for dp in drop_paths
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        init_vjepa_weights(self, self.blocks)

    def forward(self, x: Tensor, token_idx: Tensor | None = None) -> Tensor:
        """x (B, 1, D, H, W); token_idx (B, K) flat token indices to encode (the context), or None for all.

        Returns (B, K, E), or (B, N, E) when token_idx is None.
        """
        return self.forward_tokens(self.embed(x), token_idx)

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding (plus the sin-cos table if configured) of every token: (B, 1, D, H, W) -> (B, N, E).

        Split from the blocks so one embedding can serve several context sets (one per mask configuration).
        """
        expected = (1,) + tuple(self.cfg.input_shape)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"encoder input must be (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        tokens = self.patch_embed(x)  # (B, N, E)
        if self.pos_table is not None:
            tokens = tokens + self.pos_table
        return tokens

    def forward_tokens(self, tokens: Tensor, token_idx: Tensor | None = None) -> Tensor:
        """Embedded tokens (B, N, E) -> encoded (B, K, E) at token_idx (B, K), or all N when it is None."""
        if token_idx is not None:
            if token_idx.ndim != 2 or token_idx.shape[0] != tokens.shape[0]:
                raise ValueError(f"token_idx must be (B={tokens.shape[0]}, K), got {tuple(token_idx.shape)}")
            tokens = gather_tokens(tokens, token_idx)  # (B, K, E)
        rope = None
        if self.pos_table is None:
            idx = token_idx if token_idx is not None else torch.arange(self.num_tokens, device=tokens.device)[None]
            rope = RotaryCache(rope_angles(idx, self.grid, self.head_dim))
        tokens = run_blocks(self.blocks, tokens, rope, self.cfg.activation_checkpointing)
        return self.norm(tokens)
