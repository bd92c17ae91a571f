import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_model():
    from harness.zoo import MODELS

    return MODELS["tiny_cnn"](num_classes=5, in_chans=3, seed=0)


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    target = torch.tensor([0, 2, 4])
    return x, target
