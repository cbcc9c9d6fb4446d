"""Feature-map helpers every detector shares: stage alignment to the output stride, Gaussian map blur.

All functions are plain tensor code that exports to ONNX (opset 18) with ops
ONNX Runtime's CPU provider supports.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812


def map_size(tile_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Anomaly-map size ``(ceil(th / stride), ceil(tw / stride))`` of a tile."""
    return -(-tile_size[0] // stride), -(-tile_size[1] // stride)


def align_stage(
    feat: torch.Tensor,
    layer_stride: int,
    stride: int,
    size: tuple[int, int],
    upsample: Literal["nearest", "bilinear"] = "nearest",
) -> torch.Tensor:
    """Bring one backbone stage to the output stride and crop / zero-pad it to the map size.

    A finer stage (``layer_stride < stride``) is average-pooled by
    ``stride / layer_stride``; a coarser one is upsampled by
    ``layer_stride / stride`` (``nearest``, or ``bilinear`` with half-pixel
    centres).

    Args:
        feat: ``(n, c, fh, fw)`` stage output.
        layer_stride: The stage's stride (input px per feature px).
        stride: Output stride; ``layer_stride`` divides it or is a multiple of it.
        size: ``(h, w)`` map size.
        upsample: Upsampling mode of coarser stages.

    Returns:
        ``(n, c, h, w)``.
    """
    h, w = size
    if layer_stride < stride:
        k = stride // layer_stride
        # ceil_mode only where a partial window exists: same values, and ONNX Runtime's
        # ceil-mode pooling is several times slower than its plain one.
        ceil = int(feat.shape[-2]) % k != 0 or int(feat.shape[-1]) % k != 0
        feat = F.avg_pool2d(feat, kernel_size=k, stride=k, ceil_mode=ceil)
    elif layer_stride > stride:
        factor = layer_stride // stride
        if upsample == "nearest":
            feat = F.interpolate(feat, scale_factor=factor, mode="nearest")
        else:
            feat = F.interpolate(feat, scale_factor=float(factor), mode="bilinear", align_corners=False)
    fh, fw = int(feat.shape[-2]), int(feat.shape[-1])
    if fh < h or fw < w:
        feat = F.pad(feat, (0, max(0, w - fw), 0, max(0, h - fh)))
    return feat[..., :h, :w]


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian, radius ``int(4 sigma + 0.5)`` (at least 1); float32 ``(2 r + 1,)``."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_map(out: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of maps (reflect padding; replicate when a map is smaller than the radius).

    Args:
        out: ``(n, 1, h, w)`` maps.
        kernel: ``(2 r + 1,)`` from :func:`gaussian_kernel1d`.

    Returns:
        ``(n, 1, h, w)``.
    """
    h, w = int(out.shape[-2]), int(out.shape[-1])
    r = (kernel.numel() - 1) // 2
    out = F.pad(out, (r, r, r, r), mode="reflect" if min(h, w) > r else "replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def check_strides(strides: tuple[int, ...], feature_stride: int) -> None:
    """Every layer stride must divide or be a multiple of the feature stride.

    Raises:
        ValueError: Otherwise, naming the offending layer stride.
    """
    for s in strides:
        if not (s % feature_stride == 0 or feature_stride % s == 0):
            raise ValueError(
                f"model.feature_stride: {feature_stride} is not a multiple or divisor of layer stride {s} "
                f"(layer strides {list(strides)})"
            )
