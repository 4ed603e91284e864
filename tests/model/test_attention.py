import pytest
import torch

from model import Attention, RotaryCache, attention, rope_angles


@pytest.mark.parametrize("impl", ["sdpa", "xla_flash"])
def test_fused_attention_matches_explicit_softmax(impl):
    q, k, v = torch.randn(3, 2, 3, 17, 16, dtype=torch.float64).unbind(0)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v  # written out, scale 16 ** -0.5
    assert torch.allclose(attention(q, k, v, "math"), expected, atol=1e-10)
    # On a CPU tensor "xla_flash" must fall back to SDPA without importing torch_xla's TPU kernel.
    assert torch.allclose(attention(q, k, v, impl), expected, atol=1e-10)


def test_unknown_attention_impl_is_rejected():
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="impl"):
        attention(x, x, x, "flash2")


def test_attention_module_is_the_same_for_every_impl_with_rope():
    torch.manual_seed(0)
    mods = {impl: Attention(48, 4, impl) for impl in ("math", "sdpa", "xla_flash")}
    for m in list(mods.values())[1:]:
        m.load_state_dict(mods["math"].state_dict())
    x = torch.randn(2, 10, 48)
    rope = RotaryCache(rope_angles(torch.randperm(32)[:10].expand(2, 10), (2, 4, 4), 12))
    ref = mods["math"](x, rope)
    for impl in ("sdpa", "xla_flash"):
        assert torch.allclose(mods[impl](x, rope), ref, atol=1e-5), impl
