"""Transformer parts shared by the encoder and the predictor: attention, MLP, drop-path, the pre-norm Block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.rope import RotaryCache


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """Softmax attention over (B, heads, K, head_dim) tensors, scale head_dim ** -0.5, no mask.

    "sdpa": torch's fused kernel (flash path on CPU and GPU). "math": the explicit softmax, the reference the
    others are tested against. "xla_flash": torch_xla's Pallas flash-attention kernel when the tensors live on
    a TPU, SDPA anywhere else, so a config that names it runs unchanged (and gives SDPA's results) on CPU.
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "math":
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, K, K)
        return scores.softmax(dim=-1) @ v
    if impl == "xla_flash":
        if (
            q.device.type == "xla"
            and _xla_is_tpu()
            and q.shape[-2] == k.shape[-2]  # self-attention over all tokens: the case the kernel is checked for
            and _fits_flash_blocks(q.shape[-2])
        ):
            # Imported here, never at module level: model/ must import without torch_xla.
            import torch_xla.distributed.spmd as xs
            from torch_xla.experimental.custom_kernel import flash_attention

            # Under SPMD the kernel must be told how the batch is split, or it runs on the gathered whole batch.
            mesh = xs.get_global_mesh()
            spmd = {"partition_spec": (mesh.axis_names[0], None, None, None), "mesh": mesh} if mesh else {}
            return flash_attention(q, k, v, causal=False, sm_scale=q.shape[-1] ** -0.5, **spmd)
        return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"attention impl must be 'sdpa', 'math' or 'xla_flash', got {impl!r}")


def _xla_is_tpu() -> bool:
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def _fits_flash_blocks(seq_len: int) -> bool:
    """Whether the Pallas kernel tiles seq_len exactly. torch_xla 2.9 pads a longer, ragged key sequence with
    zeros and, without a bias or segment ids, attends to the padding; such lengths use SDPA instead. (The
    predictor's context + targets is always the full grid, so a grid that is a multiple of the largest
    block (1024 tokens in 2.9, forward and backward) keeps it and the target encoder on the kernel.)"""
    from torch_xla.experimental.custom_kernel import FlashAttention

    block = max(size for name, size in FlashAttention.DEFAULT_BLOCK_SIZES.items() if name != "block_b")
    return seq_len <= block or seq_len % block == 0


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional 3D rotary positions."""

    def __init__(self, embed_dim: int, num_heads: int, impl: str = "sdpa", proj_drop: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: Tensor, rope: RotaryCache | None = None, queries_from: int = 0) -> Tensor:
        """x (B, K, E) -> (B, K - queries_from, E): every token is a key and a value, and the tokens from
        `queries_from` on are the queries (all of them by default)."""
        B, K, E = x.shape
        qkv = self.qkv(x).view(B, K, 3, self.num_heads, -1)  # (B, K, 3, heads, hd)
        q, k, v = qkv.unbind(2) if rope is None else rope.apply_qkv(qkv)  # (B, K, heads, hd) each
        if queries_from:
            q = q[:, queries_from:]
        # (B, heads, K, hd) views of the (B, K, heads, hd) memory: SDPA then writes its output in (B, K, E)
        # order, so the reshape below is free.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, self.impl)  # (B, heads, Kq, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, q.shape[2], E)))


class MLP(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6 as in V-JEPA 2)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_impl: str = "sdpa",
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn = Attention(embed_dim, num_heads, attn_impl, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = MLP(embed_dim, int(embed_dim * mlp_ratio), drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, rope: RotaryCache | None = None, outputs_from: int = 0) -> Tensor:
        """x (B, K, E) -> (B, K - outputs_from, E): the block's output at the tokens from `outputs_from` on,
        which still attend to all K tokens. The rows before it cost only their keys and values, not their
        queries, attention output, projection and MLP: the same arithmetic for the rows returned."""
        h = self.attn(self.norm1(x), rope, outputs_from)
        x = (x[:, outputs_from:] if outputs_from else x) + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(
    blocks: nn.ModuleList | list[nn.Module],
    x: Tensor,
    rope: RotaryCache | None,
    checkpointing: bool,
    outputs_from: int = 0,
) -> Tensor:
    """Apply the blocks in order, optionally recomputing each block's activations in the backward pass.

    outputs_from > 0: only the rows from there on are wanted from the last block (see Block.forward)."""
    for i, blk in enumerate(blocks):
        start = outputs_from if i == len(blocks) - 1 else 0
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, rope, start, use_reentrant=False)
        else:
            x = blk(x, rope, start)
    return x


def init_vjepa_weights(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """V-JEPA 2 initialisation: truncated normal(std) for linear and conv weights, zero biases, unit norms,
    then each block's residual output projections divided by sqrt(2 * layer_id)."""
    if any(p.is_meta for p in module.parameters()):
        return  # a meta-device model (shape checks, FLOP counts) has no values to initialise
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
            blk.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)
