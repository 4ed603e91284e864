import pytest
import torch

from model import Predictor, PredictorConfig


@pytest.fixture(params=["rope", "sincos"])
def predictor(request, tiny_encoder_cfg):
    enc = tiny_encoder_cfg(pos_embed=request.param)  # grid (2, 4, 4), width 192
    pred = Predictor(PredictorConfig(depth=2, embed_dim=48, num_heads=4), enc, num_mask_tokens=2)
    with torch.no_grad():
        pred.mask_tokens.normal_()  # zero-initialised; make the two configurations distinguishable
        for blk in pred.blocks:  # at init attention is near uniform; sharpen it so positions visibly matter
            blk.attn.qkv.weight.mul_(30)
    return pred


CTX = torch.tensor([[0, 4, 9, 13, 20, 27], [1, 2, 3, 16, 17, 31]])
TGT = torch.tensor([[5, 6, 30], [8, 24, 25]])


def test_shapes_and_width(predictor):
    ctx = torch.randn(2, 6, 192)
    out = predictor(ctx, CTX, TGT, mask_index=0)
    assert out.shape == (2, 3, 192)


def test_context_order_does_not_change_predictions(predictor):
    ctx = torch.randn(2, 6, 192)
    out = predictor(ctx, CTX, TGT)
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    assert torch.allclose(predictor(ctx[:, perm], CTX[:, perm], TGT), out, atol=1e-5)
    # Target order only permutes the outputs: each prediction is tied to its position, not its slot.
    tperm = torch.tensor([2, 0, 1])
    assert torch.allclose(predictor(ctx, CTX, TGT[:, tperm]), out[:, tperm], atol=1e-5)


def test_prediction_depends_on_the_target_position_and_mask_token(predictor):
    ctx = torch.randn(2, 6, 192)
    out = predictor(ctx, CTX, TGT)
    moved = predictor(ctx, CTX, TGT + 1)  # same context, other target positions
    assert (moved - out).abs().max() > 1e-2
    assert (predictor(ctx, CTX, TGT, mask_index=1) - out).abs().max() > 1e-2


def test_rejects_mismatched_indices(predictor):
    with pytest.raises(ValueError, match="context_idx"):
        predictor(torch.randn(2, 6, 192), CTX[:, :5], TGT)


def test_configurations_batched_together_equal_separate_calls(predictor):
    ctx_a, ctx_b = torch.randn(2, 6, 192), torch.randn(2, 4, 192)
    ctx_idx_b = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    tgt_b = torch.tensor([[4, 5, 6, 7, 8], [20, 21, 22, 23, 24]])  # 4 + 5 = 6 + 3: one batch
    batched = predictor.forward_configs([(ctx_a, CTX, TGT), (ctx_b, ctx_idx_b, tgt_b)])
    assert torch.allclose(batched[0], predictor(ctx_a, CTX, TGT, mask_index=0), atol=1e-5)
    assert torch.allclose(batched[1], predictor(ctx_b, ctx_idx_b, tgt_b, mask_index=1), atol=1e-5)
    # Unequal lengths fall back to one call per configuration.
    ragged = predictor.forward_configs([(ctx_a, CTX, TGT), (ctx_b, ctx_idx_b, tgt_b[:, :2])])
    assert torch.allclose(ragged[1], predictor(ctx_b, ctx_idx_b, tgt_b[:, :2], mask_index=1), atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_block_computes_only_the_targets_and_equals_the_full_forward(predictor, checkpointing):
    """The last block runs its queries, projection and MLP on the target rows only; the result and every
    gradient equal running all blocks on every token and dropping the context rows afterwards."""
    from model import RotaryCache, rope_angles

    predictor.checkpointing = checkpointing
    ctx_a, ctx_b = torch.randn(2, 6, 192), torch.randn(2, 4, 192)
    ctx_idx_b = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    tgt_b = torch.tensor([[4, 5, 6, 7, 8], [20, 21, 22, 23, 24]])
    items = [(ctx_a, CTX, TGT), (ctx_b, ctx_idx_b, tgt_b)]

    def full(items):
        outs = []
        for i, (c, ci, ti) in enumerate(items):
            x, idx = predictor._tokens(c, ci, ti, i)
            rope = None if predictor.pos_table is not None else RotaryCache(rope_angles(idx, predictor.grid, 12))
            for blk in predictor.blocks:
                x = blk(x, rope)
            outs.append(predictor.predictor_proj(predictor.norm(x[:, c.shape[1] :])))
        return outs

    grads = []
    for fn in (predictor.forward_configs, full):
        predictor.zero_grad()
        outs = fn(items)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        grads.append((outs, {n: p.grad.clone() for n, p in predictor.named_parameters()}))
    (fast, fast_g), (ref, ref_g) = grads
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, ref))
    for name, g in ref_g.items():
        assert torch.allclose(fast_g[name], g, atol=1e-5), name


def test_block_outputs_from_equals_the_tail_of_the_full_output():
    from model import Block, RotaryCache, rope_angles

    blk = Block(48, 4, 4.0)
    x = torch.randn(2, 10, 48, requires_grad=True)
    rope = RotaryCache(rope_angles(torch.randperm(32)[:10].expand(2, 10), (2, 4, 4), 12))
    assert torch.allclose(blk(x, rope, 6), blk(x, rope)[:, 6:], atol=1e-6)
    assert torch.allclose(blk(x, None, 3), blk(x, None)[:, 3:], atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_both_paths_forced_on_the_cpu_give_the_same_outputs_and_gradients(predictor, checkpointing, monkeypatch):
    """XLA's path (every block on every token, one call) and the CPU's (the last block on the targets alone,
    once per configuration), each forced on the CPU, agree in every output and every gradient."""
    import model.predictor as predictor_module

    assert predictor_module._last_block_on_targets_only(torch.zeros(1))  # the CPU's own choice
    predictor.checkpointing = checkpointing
    ctx_a, ctx_b = torch.randn(2, 6, 192), torch.randn(2, 4, 192)
    ctx_idx_b = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    tgt_b = torch.tensor([[4, 5, 6, 7, 8], [20, 21, 22, 23, 24]])
    items = [(ctx_a, CTX, TGT), (ctx_b, ctx_idx_b, tgt_b)]
    runs = {}
    for targets_only in (True, False):
        monkeypatch.setattr(predictor_module, "_last_block_on_targets_only", lambda x, chosen=targets_only: chosen)
        predictor.zero_grad()
        outs = predictor.forward_configs(items)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        runs[targets_only] = (outs, {n: p.grad.clone() for n, p in predictor.named_parameters()})
    (fast, fast_g), (xla, xla_g) = runs[True], runs[False]
    assert [o.shape for o in fast] == [o.shape for o in xla] == [(2, 3, 192), (2, 5, 192)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, xla))
    for name, g in xla_g.items():
        assert torch.allclose(fast_g[name], g, atol=1e-5), name
