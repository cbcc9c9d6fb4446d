"""Offline backbones: the packaged ImageNet weights load correctly, others need a local file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from tilead.trainer.backbones import build_backbone, efficientnet_lite0_weights_path, map_lite0_state_dict


def _lite0_classifier() -> Any:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite0_state_dict(source, list(model.state_dict())))
    return model.eval()


def test_packaged_lite0_weights_classify_chelsea_as_egyptian_cat() -> None:
    from skimage import data

    image = data.chelsea().astype(np.float32) / 255.0  # type: ignore[no-untyped-call]  # RGB, 300x451
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5  # the package's (TF) normalization, mean = std = 0.5
    with torch.inference_mode():
        probs = _lite0_classifier()(x).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet 285: Egyptian cat
    assert float(probs[285]) > 0.5


def test_mapping_rejects_wrong_layouts() -> None:
    import timm

    keys = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="expected 296 tensors"):
        map_lite0_state_dict(dict(list(source.items())[:-1]), keys)
    shuffled = dict(reversed(list(source.items())))
    with pytest.raises(ValueError, match="does not correspond"):
        map_lite0_state_dict(shuffled, keys)


def test_default_backbone_layers_and_strides() -> None:
    extractor = build_backbone("efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"])
    info = extractor.info
    assert info.channels == (24, 40, 112)
    assert info.strides == (4, 8, 16)
    assert info.mean == (0.5, 0.5, 0.5)
    assert all(not p.requires_grad for p in extractor.parameters())
    with torch.inference_mode():
        feats = extractor(torch.zeros(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6)]
    extractor.train()
    assert not extractor.training  # frozen BatchNorm statistics


def test_default_backbone_features_equal_the_full_network() -> None:
    full = _lite0_classifier()
    extractor = build_backbone("efficientnet_lite0", ["blocks.2"])
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        y = full.bn1(full.conv_stem(x))
        for i in range(3):
            y = full.blocks[i](y)
        (got,) = extractor(x)
    torch.testing.assert_close(got, y)


def test_timm_backbone_needs_a_local_weights_file(tmp_path: Path) -> None:
    import timm

    with pytest.raises(ValueError, match="local weights file"):
        build_backbone("timm:resnet18", ["layer1"], "default")
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone("timm:resnet18", ["layer1"], str(tmp_path / "missing.pth"))
    reference: Any = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    extractor = build_backbone("timm:resnet18", ["layer1", "layer2"], str(path))
    assert extractor.info.channels == (64, 128)
    assert extractor.info.strides == (4, 8)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got = extractor(x)[0]
        ref = reference.eval().layer1(reference.maxpool(reference.act1(reference.bn1(reference.conv1(x)))))
    torch.testing.assert_close(got, ref)


def test_torchvision_backbone_from_safetensors(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file(reference.state_dict(), str(path))
    extractor = build_backbone("torchvision:resnet18", ["layer2"], str(path))
    assert extractor.info.channels == (128,)
    assert extractor.info.mean == (0.485, 0.456, 0.406)


def test_random_weights_warn_loudly() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        build_backbone("efficientnet_lite0", ["blocks.1"], "none")


def test_bad_names_and_layers() -> None:
    with pytest.raises(ValueError, match=r"backbone\.name"):
        build_backbone("resnet18", ["layer1"])
    with pytest.raises(ValueError, match=r"backbone\.layers"):
        build_backbone("efficientnet_lite0", ["blocks.99"])
    with pytest.raises(ValueError, match="at least one"):
        build_backbone("efficientnet_lite0", [])
