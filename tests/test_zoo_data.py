"""Model zoo and datasets: real weights, block metadata, offline behaviour, clear errors."""
import time

import pytest
import torch
from torch import nn

from harness.base.meta import block_modules, fallback_meta, gradcam_layer, model_meta
from harness.data import DATASETS
from harness.zoo import MODELS


@pytest.fixture(scope="module")
def lite0():
    return MODELS["efficientnet_lite0"]()


def test_efficientnet_lite0_classifies_foolbox_photos(lite0):
    data = DATASETS["imagenet_samples"](n=20, data_config=model_meta(lite0).data_config)
    assert data.inputs.shape == (20, 3, 224, 224)
    with torch.no_grad():
        predicted = lite0(data.inputs).argmax(1)
    assert (predicted == data.labels).sum().item() >= 15


def test_efficientnet_lite0_blocks_and_no_inplace(lite0):
    meta = model_meta(lite0)
    assert meta.blocks == ["conv_stem", *[f"blocks.{i}" for i in range(7)], "conv_head",
                           "classifier"]
    assert meta.data_config["mean"] == (0.5, 0.5, 0.5)
    assert not any(getattr(m, "inplace", False) for m in lite0.modules())
    assert [type(m).__name__ for m in block_modules(lite0, "conv_stem")] == ["Conv2dSame",
                                                                             "BatchNormAct2d"]
    assert gradcam_layer(lite0) is lite0.bn2


def test_resnet_blocks():
    model = MODELS["timm"](name="resnet18", num_classes=10)
    assert model_meta(model).blocks == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert model_meta(model).gradcam_layer == "layer4"


def test_vgg_blocks_are_convs_then_dense():
    model = MODELS["timm"](name="vgg11", num_classes=10)
    blocks = model_meta(model).blocks
    convs = [b for b in blocks if b.startswith("features.")]
    assert len(convs) == 8 and blocks[: len(convs)] == convs
    assert all(isinstance(model.get_submodule(b), (nn.Linear, nn.Conv2d)) for b in blocks)


def test_inception_v3_has_the_papers_17_blocks():
    model = MODELS["timm"](name="inception_v3", num_classes=10)
    blocks = model_meta(model).blocks
    assert len(blocks) == 17 and blocks[0] == "Conv2d_1a_3x3" and blocks[-2] == "Mixed_7c"


def test_fallback_meta_uses_top_level_children():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    meta = fallback_meta(model)
    assert meta.blocks == ["0", "3"] and meta.gradcam_layer == "0"


def test_pretrained_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tic = time.perf_counter()
    with pytest.raises(RuntimeError, match="model.checkpoint=PATH"):
        MODELS["timm"](name="resnet18", pretrained=True)
    assert time.perf_counter() - tic < 5


def test_checkpoint_round_trip(tmp_path):
    source = MODELS["timm"](name="resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = MODELS["timm"](name="resnet18", num_classes=10, checkpoint=str(tmp_path / "w.pth"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(),
                                                 loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no such file"):
        MODELS["timm"](name="resnet18", checkpoint=str(tmp_path / "missing.pth"))


def test_mnist_cnn_forward():
    model = MODELS["mnist_cnn"]()
    data = DATASETS["digits"](n=5, data_config=model_meta(model).data_config)
    assert data.inputs.shape == (5, 1, 28, 28) and 0 <= data.inputs.min() <= data.inputs.max() <= 1
    assert model(data.inputs).shape == (5, 10)


def test_imagenet_folder(tmp_path):
    from PIL import Image

    for label, name in enumerate(["n01", "n02"]):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30), color=(50 * label, 0, 0)).save(tmp_path / name / "a.png")
    data = DATASETS["imagenet_folder"](root=str(tmp_path), n=10,
                                       data_config={"input_size": (3, 32, 32)})
    assert data.inputs.shape == (2, 3, 32, 32) and data.labels.tolist() == [0, 1]
    (tmp_path / "n02" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="b.jpg"):
        DATASETS["imagenet_folder"](root=str(tmp_path), data_config={"input_size": (3, 32, 32)})


def test_imagenet_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset.root"):
        DATASETS["imagenet_folder"](root=None)
    with pytest.raises(FileNotFoundError, match="no images"):
        DATASETS["imagenet_folder"](root=str(tmp_path))


def test_display_images_invert_normalization():
    config = {"input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    data = DATASETS["digits"](n=3, data_config=config)
    images = data.display_images()
    assert images.shape == (3, 28, 28, 3) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), data.inputs * 0.5 + 0.5)
