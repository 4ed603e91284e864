"""V-JEPA 2 predictor: a narrow transformer that sees the context tokens plus one mask token per target position.

Positions travel with the tokens (rotary angles or sin-cos rows looked up from the flat indices), so, unlike
V-JEPA 2, nothing is argsorted back into grid order: attention does not care about sequence order. Only
gathers on index tensors, no per-sample Python loop: one static graph, all mask configurations batched
together when their sequences have the same length (context + targets = the whole grid).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import Block, init_vjepa_weights, run_blocks
from model.config import EncoderConfig, PredictorConfig
from model.rope import RotaryCache, rope_angles, sincos_table_3d


class Predictor(nn.Module):
    def __init__(self, cfg: PredictorConfig, encoder_cfg: EncoderConfig, num_mask_tokens: int) -> None:
        super().__init__()
        if num_mask_tokens <= 0:
            raise ValueError(f"num_mask_tokens must be > 0, got {num_mask_tokens}")
        self.cfg = cfg
        self.grid = encoder_cfg.grid
        self.checkpointing = encoder_cfg.activation_checkpointing
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.predictor_embed = nn.Linear(encoder_cfg.embed_dim, cfg.embed_dim)
        # One learnable token per mask configuration, zero-initialised (V-JEPA 2's zero_init_mask_tokens).
        self.mask_tokens = nn.Parameter(torch.zeros(num_mask_tokens, cfg.embed_dim))
        if encoder_cfg.pos_embed == "sincos":
            self.register_buffer("pos_table", sincos_table_3d(cfg.embed_dim, self.grid), persistent=False)
        else:
            self.pos_table = None
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, encoder_cfg.attn_impl) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(cfg.embed_dim, encoder_cfg.embed_dim)
        init_vjepa_weights(self, self.blocks)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor, mask_index: int = 0) -> Tensor:
        """context (B, Kc, E) encoder outputs at context_idx (B, Kc); predicts (B, Kt, E) at target_idx (B, Kt)."""
        return self.forward_configs([(context, context_idx, target_idx)], first_mask_index=mask_index)[0]

    def forward_configs(self, items: list[tuple[Tensor, Tensor, Tensor]], first_mask_index: int = 0) -> list[Tensor]:
        """Predict for several mask configurations: items[i] = (context, context_idx, target_idx) uses mask
        token first_mask_index + i; returns one (B, Kt_i, E) per item.

        When every configuration has the same Kc + Kt (always, for MultiBlockMasks: context + targets is the
        whole grid) they run as one batch through the blocks: the same arithmetic in half the calls, with
        twice the rows per matmul."""
        seqs = [self._tokens(c, ci, ti, first_mask_index + i) for i, (c, ci, ti) in enumerate(items)]
        if len({x.shape[1] for x, _ in seqs}) > 1:
            return [self._predict([s], [c.shape[1]])[0] for s, (c, _, _) in zip(seqs, items)]
        return self._predict(seqs, [c.shape[1] for c, _, _ in items])

    def _tokens(self, context: Tensor, context_idx: Tensor, target_idx: Tensor, mask_index: int):
        """(B, Kc + Kt, P) predictor input (context projections, then mask tokens) and its flat positions."""
        B, Kc, _ = context.shape
        if context_idx.shape != (B, Kc):
            raise ValueError(f"context_idx must be {(B, Kc)} to match the context, got {tuple(context_idx.shape)}")
        if target_idx.ndim != 2 or target_idx.shape[0] != B:
            raise ValueError(f"target_idx must be (B={B}, Kt), got {tuple(target_idx.shape)}")
        x = self.predictor_embed(context)  # (B, Kc, P)
        targets = self.mask_tokens[mask_index % self.mask_tokens.shape[0]].expand(B, target_idx.shape[1], -1)
        if self.pos_table is not None:
            x = x + self.pos_table[context_idx]
            targets = targets + self.pos_table[target_idx]
        return torch.cat((x, targets), dim=1), torch.cat((context_idx, target_idx), dim=1)

    def _predict(self, seqs: list[tuple[Tensor, Tensor]], num_context: list[int]) -> list[Tensor]:
        x = torch.cat([t for t, _ in seqs], dim=0)  # (n * B, L, P): full self-attention within each sequence
        rope = None
        if self.pos_table is None:
            idx = torch.cat([i for _, i in seqs], dim=0)  # (n * B, L)
            rope = RotaryCache(rope_angles(idx, self.grid, self.head_dim))
        sizes = [t.shape[0] for t, _ in seqs]
        run = self._last_block_on_targets if _last_block_on_targets_only(x) else self._every_block_on_every_token
        outs = run(x, rope, sizes, num_context)  # one (B, Kt, P) per configuration
        return [self.predictor_proj(self.norm(o)) for o in outs]  # (B, Kt, E)

    def _every_block_on_every_token(
        self, x: Tensor, rope: RotaryCache | None, sizes: list[int], num_context: list[int]
    ) -> list[Tensor]:
        """One call of every block on all n * B sequences, the context rows dropped at the end."""
        x = run_blocks(self.blocks, x, rope, self.checkpointing)
        return [o[:, kc:] for o, kc in zip(x.split(sizes, dim=0), num_context)]

    def _last_block_on_targets(
        self, x: Tensor, rope: RotaryCache | None, sizes: list[int], num_context: list[int]
    ) -> list[Tensor]:
        """All blocks but the last on every token; the last on each configuration's target rows alone, where the
        context tokens are keys and values only (no queries, projection or MLP rows). The configurations differ
        in their number of targets, so the last block runs once per configuration."""
        x = run_blocks(self.blocks[:-1], x, rope, self.checkpointing)
        outs, start = [], 0
        for o, n, kc in zip(x.split(sizes, dim=0), sizes, num_context):
            r = None if rope is None else rope.rows(start, start + n)
            outs.append(run_blocks(self.blocks[-1:], o, r, self.checkpointing, outputs_from=kc))
            start += n
        return outs


def _last_block_on_targets_only(x: Tensor) -> bool:
    """Whether the predictor's last block runs on the targets' rows only, once per configuration (CPU, CUDA:
    fewer rows, the same numbers), rather than every block on every token in one call. XLA keeps the one
    static graph it has always run: all blocks batched over every configuration, every attention square (as
    many queries as keys), the case the Pallas flash-attention kernel is checked for; the target-only last
    block would add one differently shaped attention per configuration."""
    return x.device.type != "xla"
