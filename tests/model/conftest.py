"""Tiny model configurations shared by the model tests (12 tiny blocks over 32 tokens run in milliseconds).

Exposed as factory fixtures, since test modules cannot import each other under --import-mode=importlib.
"""

import pytest
import torch

from model import (
    EncoderConfig,
    MaskBlockConfig,
    MaskConfig,
    ModelConfig,
    PredictorConfig,
)


def _tiny_encoder(**overrides) -> EncoderConfig:
    kwargs = {"size": "tiny", "patch_size": (2, 4, 4), "input_shape": (4, 16, 16)}  # grid (2, 4, 4): 32 tokens
    kwargs.update(overrides)
    return EncoderConfig(**kwargs)


def _tiny_model(**encoder_overrides) -> ModelConfig:
    return ModelConfig(
        encoder=_tiny_encoder(**encoder_overrides),
        predictor=PredictorConfig(depth=2, embed_dim=48, num_heads=4),
        masks=MaskConfig(blocks=(MaskBlockConfig(2, 0.25), MaskBlockConfig(1, 0.5))),
    )


@pytest.fixture
def tiny_encoder_cfg():
    return _tiny_encoder


@pytest.fixture
def tiny_model_cfg():
    return _tiny_model


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One thread: these tensors are tiny, and on a busy 2-core CI box a second spinning thread only slows them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
