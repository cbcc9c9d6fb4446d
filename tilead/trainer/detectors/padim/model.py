"""PaDiM (Defard et al., 2020) for one tile location.

A location's model is a multivariate Gaussian per feature-map position: the
backbone's layers are brought to one resolution (``feature_stride``), a seeded
random subset of ``n_features`` channels is kept, and at every position ``p``
the mean ``mu_p`` and the regularized inverse covariance
``inv(Sigma_p + eps * I)`` are fitted on defect-free tiles. A tile's anomaly
map is the Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` at every
position, optionally blurred by a small Gaussian.

Fitting is incremental (:class:`PadimAccumulator`): float64 sums of the
features and of their outer products, centred on the first batch's mean
(which keeps the one-pass covariance free of cancellation), so memory is one
location's ``positions x d x d`` whatever the number of images.

Layer alignment (our choice, stated): a layer finer than ``feature_stride`` is
average-pooled down to it, a coarser one is upsampled with nearest neighbour
(as PaDiM's embedding concatenation does), and every layer is then cropped or
zero-padded to ``ceil(tile / feature_stride)`` positions per axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.maps import align_stage, blur_map, gaussian_kernel1d, map_size

_FINALIZE_CHUNK = 256  # positions inverted at a time


@dataclass(frozen=True)
class PadimSettings:
    """Hyper-parameters of one PaDiM location model.

    Attributes:
        feature_stride: Output stride of the anomaly map (input px per map px).
        n_features: Channels kept (random subset of the concatenated layers).
        eps: Covariance regularization ``eps * I``.
        blur_sigma: Gaussian blur of the map in map pixels (0: none).
        storage_dtype: dtype of the stored inverse covariances.
        seed: Seed of the channel subset.
    """

    feature_stride: int = 8
    n_features: int = 100
    eps: float = 0.01
    blur_sigma: float = 0.0
    storage_dtype: str = "float16"
    seed: int = 0


def channel_subset(total: int, n_features: int, seed: int) -> torch.Tensor:
    """Seeded random subset of ``n_features`` of ``total`` channels, sorted.

    Raises:
        ValueError: If more channels are asked for than the layers have.
    """
    if not 1 <= n_features <= total:
        raise ValueError(f"model.n_features: expected 1..{total} (channels of the chosen layers), got {n_features}")
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(total, generator=gen)[:n_features]).values


class Embedding(nn.Module):
    """Backbone layers aligned to one stride, concatenated, channel-subsampled.

    Input ``(n, 3, th, tw)`` normalized tiles; output ``(n, d, h, w)`` with
    ``(h, w) = map_size((th, tw), stride)``.
    """

    index: torch.Tensor

    def __init__(self, backbone: FeatureExtractor, stride: int, index: torch.Tensor, size: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.stride = stride
        self.size = size
        self.register_buffer("index", index.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Args:
            x: ``(n, 3, th, tw)`` normalized tiles.

        Returns:
            ``(n, d, h, w)`` float32.
        """
        feats = self.backbone(x)
        aligned = [
            align_stage(f, s, self.stride, self.size) for f, s in zip(feats, self.backbone.info.strides, strict=True)
        ]
        emb = torch.cat(aligned, dim=1)
        return emb.index_select(1, self.index)


class PadimAccumulator:
    """Streaming first and second moments of embeddings at every position.

    Memory: ``positions * d * d`` float64 (plus ``positions * d``).
    """

    def __init__(self, positions: int, dim: int) -> None:
        self.positions = positions
        self.dim = dim
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(positions, dim, dtype=torch.float64)
        self.outer = torch.zeros(positions, dim, dim, dtype=torch.float64)

    def update(self, emb: torch.Tensor) -> None:
        """Add a batch of embeddings.

        Args:
            emb: ``(n, d, h, w)`` with ``h * w == positions``.
        """
        n, d = int(emb.shape[0]), int(emb.shape[1])
        if d != self.dim or emb.shape[2] * emb.shape[3] != self.positions:
            raise ValueError(
                f"embedding: expected (n, {self.dim}, h, w) with h*w = {self.positions}, got {tuple(emb.shape)}"
            )
        x = emb.detach().reshape(n, d, self.positions).permute(2, 0, 1).to(torch.float64)  # (P, n, d)
        if self.shift is None:
            self.shift = x.mean(dim=1)
        x = x - self.shift[:, None, :]
        self.sum += x.sum(dim=1)
        self.outer.baddbmm_(x.transpose(1, 2), x)
        self.count += n

    def finalize(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and regularized inverse covariance.

        Args:
            eps: Added to the covariance diagonal.

        Returns:
            ``mean (P, d)`` float32 and ``inv_cov (P, d, d)`` float32.

        Raises:
            ValueError: With fewer than 2 samples.
        """
        if self.count < 2 or self.shift is None:
            raise ValueError(f"PaDiM needs at least 2 training tiles per location, got {self.count}")
        n = self.count
        m = self.sum / n  # mean of shifted features
        inv = torch.empty(self.positions, self.dim, self.dim, dtype=torch.float32)
        eye = eps * torch.eye(self.dim, dtype=torch.float64)
        # In chunks of positions, so the float64 temporaries stay small next to the accumulator.
        for lo in range(0, self.positions, _FINALIZE_CHUNK):
            hi = min(lo + _FINALIZE_CHUNK, self.positions)
            mc = m[lo:hi]
            cov = (self.outer[lo:hi] - n * mc[:, :, None] * mc[:, None, :]) / (n - 1) + eye
            full = torch.cholesky_inverse(torch.linalg.cholesky(cov))
            inv[lo:hi] = 0.5 * (full + full.transpose(1, 2))
        mean = (m + self.shift).to(torch.float32)
        return mean, inv


class PadimHead(nn.Module):
    """Mahalanobis distance map from embeddings.

    Input ``(n, d, h, w)``; output ``(n, 1, h, w)`` float32.
    """

    mean: torch.Tensor
    inv_cov: torch.Tensor
    blur: torch.Tensor

    def __init__(self, mean: torch.Tensor, inv_cov: torch.Tensor, size: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", mean.to(torch.float32).contiguous())
        # Kept in its storage dtype (fp16 by default) and widened in forward: an exported graph then
        # stores the fp16 tensor plus a Cast, half the size, and computes exactly what the eager model does.
        self.register_buffer("inv_cov", inv_cov.contiguous())
        self.blur_sigma = float(blur_sigma)
        if self.blur_sigma > 0:
            self.register_buffer("blur", gaussian_kernel1d(self.blur_sigma))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Distance map.

        Args:
            emb: ``(n, d, h, w)``.

        Returns:
            ``(n, 1, h, w)``.
        """
        n, d = emb.shape[0], emb.shape[1]
        h, w = self.size
        x = emb.reshape(n, d, h * w).permute(2, 0, 1)  # (P, n, d)
        diff = x - self.mean[:, None, :]
        dist = self.squared_distance(diff).clamp_min(0.0).sqrt()  # (P, n)
        out = dist.permute(1, 0).reshape(n, 1, h, w)
        return blur_map(out, self.blur) if self.blur_sigma > 0 else out

    def squared_distance(self, diff: torch.Tensor) -> torch.Tensor:
        """``diff^T inv_cov diff`` per position: ``(P, n, d)`` to ``(P, n)``."""
        prod = torch.matmul(diff, self.inv_cov.to(torch.float32))  # (P, n, d)
        return (prod * diff).sum(dim=2)


class BlockRowPadimHead(PadimHead):
    """:class:`PadimHead` with the quadratic form computed on block rows of the upper triangle.

    ``x^T A x`` only depends on the symmetric part of ``A``. Split ``d`` into
    ``k`` blocks; block row ``i`` holds ``A_ii`` and ``A_ij + A_ji^T`` for
    ``j > i``, and ``x^T A x = sum_i (x_i R_i) . x_{i:}``. That reads
    ``(k + 1) / (2k)`` of the matrix (62.5 % for ``k = 4``) in ``k`` batched
    products: the per-position matrices are the memory-bound part of PaDiM
    inference, so the exporter uses this form. The result equals
    :class:`PadimHead`'s up to float summation order (the exporter checks it
    against the plain model). Rows whose values are exact in the storage dtype
    (always, for a symmetric fp16 matrix) are kept in it.

    Input ``(n, d, h, w)``; output ``(n, 1, h, w)`` float32.
    """

    def __init__(
        self, mean: torch.Tensor, inv_cov: torch.Tensor, size: tuple[int, int], blur_sigma: float, blocks: int = 4
    ) -> None:
        d = int(inv_cov.shape[-1])
        if not 1 <= blocks <= d:
            raise ValueError(f"blocks: expected 1..{d}, got {blocks}")
        # The parent keeps a 0-element placeholder: the block rows below replace the full matrix.
        super().__init__(mean, inv_cov[:, :0, :0], size, blur_sigma)
        self.bounds = [round(i * d / blocks) for i in range(blocks + 1)]
        full = inv_cov.to(torch.float32)
        for i in range(blocks):
            a, b = self.bounds[i], self.bounds[i + 1]
            row = full[:, a:b, a:].clone()
            row[:, :, b - a :] += full[:, b:, a:b].transpose(1, 2)
            narrow = row.to(inv_cov.dtype)
            keep = narrow if torch.equal(narrow.to(torch.float32), row) else row
            self.register_buffer(f"row{i}", keep.contiguous())

    def squared_distance(self, diff: torch.Tensor) -> torch.Tensor:
        """Block-row form of :meth:`PadimHead.squared_distance`."""
        total = torch.zeros(diff.shape[:2], dtype=torch.float32, device=diff.device)
        for i in range(len(self.bounds) - 1):
            a, b = self.bounds[i], self.bounds[i + 1]
            row = getattr(self, f"row{i}").to(torch.float32)  # (P, b - a, d - a)
            total = total + (torch.matmul(diff[..., a:b], row) * diff[..., a:]).sum(dim=2)
        return total


class PadimLocationModel(LocationModel):
    """One tile location's full model: tiles in, anomaly map out.

    Input ``(n, 3, th, tw)`` float32 normalized tiles (the runtime tile
    kernel's output block for this location); output ``(n, 1, h, w)`` with
    ``(h, w) = map_size((th, tw), feature_stride)``.
    """

    def __init__(self, embedding: Embedding, head: PadimHead) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly map of a tile batch."""
        out: torch.Tensor = self.head(self.embedding(x))
        return out


def state_tensors(
    mean: torch.Tensor, inv_cov: torch.Tensor, index: torch.Tensor, storage_dtype: str
) -> dict[str, torch.Tensor]:
    """The tensors saved per location (safetensors)."""
    dtype = torch.float16 if storage_dtype == "float16" else torch.float32
    return {
        "mean": mean.to(torch.float32).contiguous(),
        "inv_cov": inv_cov.to(dtype).contiguous(),
        "channel_index": index.to(torch.int64).contiguous(),
    }


def state_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a location's fitted state."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_location_model(
    backbone: FeatureExtractor,
    tensors: dict[str, Any],
    tile_size: tuple[int, int],
    settings: PadimSettings,
    *,
    head_blocks: int | None = None,
) -> PadimLocationModel:
    """Assemble a location model from a backbone and saved tensors.

    Args:
        backbone: The shared feature extractor.
        tensors: The location's saved state.
        tile_size: ``(th, tw)``.
        settings: PaDiM settings of the run.
        head_blocks: None for the plain head (training, evaluation); a block
            count for :class:`BlockRowPadimHead` (the exported graph).

    Raises:
        ValueError: If the tensors do not fit the tile size and settings.
    """
    size = map_size(tile_size, settings.feature_stride)
    mean = tensors["mean"]
    inv_cov = tensors["inv_cov"]
    index = tensors["channel_index"]
    positions, d = size[0] * size[1], int(index.numel())
    if tuple(mean.shape) != (positions, d) or tuple(inv_cov.shape) != (positions, d, d):
        raise ValueError(
            f"PaDiM state: expected mean {(positions, d)} and inv_cov {(positions, d, d)} for tile {tile_size} at "
            f"stride {settings.feature_stride}, got {tuple(mean.shape)} and {tuple(inv_cov.shape)}"
        )
    embedding = Embedding(backbone, settings.feature_stride, index, size)
    head = (
        PadimHead(mean, inv_cov, size, settings.blur_sigma)
        if head_blocks is None
        else BlockRowPadimHead(mean, inv_cov, size, settings.blur_sigma, head_blocks)
    )
    return PadimLocationModel(embedding, head).eval()
