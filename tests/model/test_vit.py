import dataclasses

import pytest
import torch

from model import SIZES, EncoderConfig, VisionTransformer3D


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_shapes_with_and_without_token_subset(size, pos_embed, tiny_encoder_cfg):
    cfg = tiny_encoder_cfg(size=size, pos_embed=pos_embed, patch_size=(2, 8, 8))  # 8 tokens
    enc = VisionTransformer3D(cfg)
    x = torch.randn(2, 1, 4, 16, 16)
    assert enc.grid == (2, 2, 2) and enc.embed_dim == SIZES[size][0]
    assert enc(x).shape == (2, 8, SIZES[size][0])
    idx = torch.tensor([[0, 3, 5], [7, 1, 2]])
    assert enc(x, idx).shape == (2, 3, SIZES[size][0])


@pytest.mark.parametrize("size", ["base", "large"])
def test_shapes_for_large_sizes_on_the_meta_device(size):
    cfg = EncoderConfig(size=size)  # default 64 x 384 x 384 volume, patch (4, 16, 16): 9216 tokens
    with torch.device("meta"):
        enc = VisionTransformer3D(cfg)
        x = torch.empty(2, 1, 64, 384, 384)
        assert enc(x).shape == (2, 9216, SIZES[size][0])
        assert enc(x, torch.zeros(2, 100, dtype=torch.long)).shape == (2, 100, SIZES[size][0])
    assert len(enc.blocks) == SIZES[size][1] and enc.blocks[0].attn.num_heads == SIZES[size][2]


def test_encoding_every_index_in_order_equals_the_full_forward(tiny_encoder_cfg):
    enc = VisionTransformer3D(tiny_encoder_cfg())
    x = torch.randn(2, 1, 4, 16, 16)
    idx = torch.arange(32).expand(2, 32)
    assert torch.allclose(enc(x, idx), enc(x), atol=1e-5)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_a_token_subset_keeps_its_positions_in_any_order(pos_embed, tiny_encoder_cfg):
    enc = VisionTransformer3D(tiny_encoder_cfg(pos_embed=pos_embed))
    x = torch.randn(1, 1, 4, 16, 16)
    idx = torch.tensor([[3, 9, 17, 29, 30, 12]])
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out = enc(x, idx)
    assert torch.allclose(enc(x, idx[:, perm]), out[:, perm], atol=1e-5)
    # ... and the positions matter: the same patches at other indices encode differently.
    assert not torch.allclose(enc(x, idx + 1), out, atol=1e-3)


def test_rejects_wrong_input_shape(tiny_encoder_cfg):
    enc = VisionTransformer3D(tiny_encoder_cfg())
    with pytest.raises(ValueError, match=r"encoder input must be \(B, 1, 4, 16, 16\)"):
        enc(torch.randn(2, 1, 4, 16, 12))


def test_vjepa2_initialisation(tiny_encoder_cfg):
    enc = VisionTransformer3D(tiny_encoder_cfg(size="small", input_shape=(4, 64, 64)))
    qkv = enc.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and qkv.bias.abs().max() == 0
    assert abs(enc.patch_embed.proj.weight.std().item() - 0.02) < 0.003
    for layer_id in (1, 6, 12):
        blk = enc.blocks[layer_id - 1]
        expected = 0.02 / (2 * layer_id) ** 0.5
        assert abs(blk.mlp.fc2.weight.std().item() - expected) < 0.1 * expected
        assert abs(blk.attn.proj.weight.std().item() - expected) < 0.1 * expected


def test_activation_checkpointing_gives_the_same_output_and_gradients(tiny_encoder_cfg):
    cfg = tiny_encoder_cfg(drop_path=0.2)  # drop-path randomness must be replayed identically
    plain = VisionTransformer3D(cfg)
    ckpt = VisionTransformer3D(dataclasses.replace(cfg, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 4, 16, 16)
    idx = torch.tensor([[0, 5, 9, 20], [1, 2, 3, 31]])
    outs = []
    for enc in (plain, ckpt):
        torch.manual_seed(1)
        out = enc(x, idx)
        out.pow(2).sum().backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
