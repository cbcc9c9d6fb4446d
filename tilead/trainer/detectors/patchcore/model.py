"""PatchCore (Roth et al., 2022) for one tile location: patch features, memory bank, nearest-neighbour map.

Per location:

* **Locally aware patch features** (:class:`PatchEmbedding`): two backbone
  stages (default ``blocks.2`` and ``blocks.3`` of EfficientNet-Lite0, strides
  8 and 16), each averaged over a ``local_kernel`` x ``local_kernel``
  neighbourhood (stride 1, borders averaged over the valid pixels only), the
  coarser stage upsampled bilinearly to ``feature_stride`` (a finer one
  average-pooled down), concatenated and cropped / zero-padded to
  ``ceil(tile / feature_stride)`` positions per axis.
* **Memory bank** (:func:`greedy_coreset`): the fit patches (a seeded uniform
  subsample of at most ``max_candidates``) reduced to
  ``ceil(coreset_ratio * patches)`` entries by greedy k-center selection,
  distances measured after a sparse random projection to ``projection_dim``.
  The candidate cap is our pragmatic choice for CPU training: the greedy loop
  reads every candidate once per selected entry, so its cost is
  ``candidates x bank x projection_dim``.
* **Anomaly map** (:class:`NearestNeighbourHead`): for every patch ``x`` the
  nearest bank entry is found with one matrix product
  (``argmin_m |m|^2 - 2 x.m``; ``|x|^2`` does not change the argmin), then the
  distance to that entry is recomputed exactly, ``|x - m*|`` (no cancellation
  of the expanded form, so ONNX Runtime and PyTorch agree closely even for
  near-zero distances). Both entries and patches are centred on the bank mean
  first. Optional Gaussian blur as for PaDiM.
* **Image score** (:meth:`PatchCoreLocationModel.forward_with_score`): the
  paper's reweighting of the most anomalous patch's distance ``s*``,
  ``s = (1 - exp|m_test - m*| / sum_b exp|m_test - m_b|) * s*`` over the
  ``num_neighbors`` bank entries nearest to ``m*`` (``m*`` itself first;
  precomputed at fit time). Eager evaluation always reports it; with
  ``postprocess.image_score: detector`` it is exported as a second graph
  output ``score`` and deployed (otherwise the bundle's image score is the max
  of the final map and the exported graph holds no neighbour table).

State tensors: ``bank`` ``(M, D)`` in ``storage_dtype`` (centred), ``center``
float32 ``(D,)``, ``neighbors`` int64 ``(M, b)`` (int32 in the exported graph).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from tilead.trainer.backbones import FeatureExtractor
from tilead.trainer.detectors.base import LocationModel
from tilead.trainer.maps import align_stage, blur_map, gaussian_kernel1d

_NEIGHBOR_CHUNK = 2048  # bank rows per chunk of the bank-to-bank distance matrix


class PatchEmbedding(nn.Module):
    """Locally aware patch features of tiles.

    Input ``(n, 3, th, tw)`` normalized tiles; output ``(n, D, h, w)`` float32
    with ``D`` the summed channels of the backbone's layers and
    ``(h, w) = ceil((th, tw) / stride)``.

    Args:
        backbone: Frozen feature extractor (its layers are the stages used).
        stride: Output stride (every layer stride divides it or is a multiple of it).
        size: ``(h, w)`` map size.
        local_kernel: Odd side of the local averaging neighbourhood (1: none).
    """

    def __init__(self, backbone: FeatureExtractor, stride: int, size: tuple[int, int], local_kernel: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stride = stride
        self.size = size
        self.local_kernel = local_kernel

    def _aggregate(self, feat: torch.Tensor) -> torch.Tensor:
        k = self.local_kernel
        if k == 1:
            return feat
        return F.avg_pool2d(feat, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Args:
            x: ``(n, 3, th, tw)`` normalized tiles.

        Returns:
            ``(n, D, h, w)`` float32.
        """
        feats = self.backbone(x)
        strides = self.backbone.info.strides
        return torch.cat(
            [
                align_stage(self._aggregate(f), s, self.stride, self.size, upsample="bilinear")
                for f, s in zip(feats, strides, strict=True)
            ],
            dim=1,
        )


class NearestNeighbourHead(nn.Module):
    """Distance of every patch to its nearest memory-bank entry.

    Input ``(n, D, h, w)`` embeddings; :meth:`forward` returns the (blurred)
    map ``(n, 1, h, w)``; :meth:`nearest` the raw distances and indices.

    Args:
        bank: ``(M, D)`` centred bank entries (any float dtype; widened in forward,
            so an fp16 bank is stored as fp16 in the exported graph).
        center: ``(D,)`` the centre subtracted from the entries.
        size: ``(h, w)``.
        blur_sigma: Gaussian sigma in map pixels (0: none).
    """

    bank: torch.Tensor
    center: torch.Tensor
    blur: torch.Tensor

    def __init__(self, bank: torch.Tensor, center: torch.Tensor, size: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("bank", bank.contiguous())
        self.register_buffer("center", center.to(torch.float32).contiguous())
        self.blur_sigma = float(blur_sigma)
        if self.blur_sigma > 0:
            self.register_buffer("blur", gaussian_kernel1d(self.blur_sigma))

    def patches(self, emb: torch.Tensor) -> torch.Tensor:
        """Centred patch features ``(n, P, D)`` of embeddings ``(n, D, h, w)``."""
        n, d = emb.shape[0], emb.shape[1]
        return emb.reshape(n, d, -1).transpose(1, 2) - self.center

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank entries of centred patches.

        Args:
            x: ``(n, P, D)`` centred patch features.

        Returns:
            ``(dist, index)``: float32 ``(n, P)`` Euclidean distances and int64
            ``(n, P)`` bank indices.
        """
        bank = self.bank.to(torch.float32)
        # argmin_m |x - m|^2 = argmin_m (|m|^2 - 2 x.m): one matrix product, no |x|^2 needed.
        scores = (bank * bank).sum(dim=1) - 2.0 * torch.matmul(x, bank.transpose(0, 1))  # (n, P, M)
        index = torch.argmin(scores, dim=2)  # (n, P)
        nearest = F.embedding(index, bank)  # (n, P, D): a Gather in ONNX
        dist = (x - nearest).square().sum(dim=2).sqrt()
        return dist, index

    def to_map(self, dist: torch.Tensor) -> torch.Tensor:
        """``(n, P)`` distances to the (blurred) ``(n, 1, h, w)`` map."""
        h, w = self.size
        out = dist.reshape(dist.shape[0], 1, h, w)
        return blur_map(out, self.blur) if self.blur_sigma > 0 else out

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Anomaly map ``(n, 1, h, w)`` of embeddings ``(n, D, h, w)``."""
        dist, _ = self.nearest(self.patches(emb))
        return self.to_map(dist)


def reweighted_score(
    x: torch.Tensor, dist: torch.Tensor, index: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor
) -> torch.Tensor:
    """PatchCore's image score: the most anomalous patch's distance, reweighted by its bank neighbourhood.

    ``s = (1 - exp|m_test - m*| / sum_b exp|m_test - m_b|) * s*`` where
    ``m_test`` is the patch with the largest nearest-neighbour distance
    ``s*``, ``m*`` its nearest bank entry and ``m_b`` the ``b`` bank entries
    nearest to ``m*`` (``m*`` itself first). Computed as a softmax (stable).
    Written with gathers only (ArgMax, GatherElements, Gather, Softmax in
    ONNX), so it exports with a dynamic batch.

    Args:
        x: ``(n, P, D)`` centred patch features.
        dist: ``(n, P)`` nearest-neighbour distances.
        index: ``(n, P)`` nearest bank indices.
        bank: ``(M, D)`` float32 centred bank.
        neighbors: ``(M, b)`` integer, row ``i`` the ``b`` entries nearest to entry ``i``, ``i`` first.

    Returns:
        float32 ``(n,)``.
    """
    star = dist.argmax(dim=1, keepdim=True)  # (n, 1)
    s_star = dist.gather(1, star)[:, 0]  # (n,)
    m_test = x.gather(1, star[:, :, None].expand(-1, -1, x.shape[2]))  # (n, 1, D)
    nearest = index.gather(1, star)[:, 0]  # (n,) the bank index of m*
    support = F.embedding(neighbors.index_select(0, nearest).to(torch.int64), bank)  # (n, b, D)
    d_support = (support - m_test).square().sum(dim=2).sqrt()  # (n, b)
    weight = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
    return weight * s_star


class PatchCoreLocationModel(LocationModel):
    """One location's PatchCore: tiles ``(n, 3, th, tw)`` to a distance map ``(n, 1, h, w)``.

    Args:
        embedding: Patch features.
        head: Nearest-neighbour distances.
        neighbors: ``(M, b)`` bank neighbour table of the image score, or None
            for a map-only export (its ONNX then holds no table).
    """

    has_image_score = True
    neighbors: torch.Tensor | None

    def __init__(self, embedding: PatchEmbedding, head: NearestNeighbourHead, neighbors: torch.Tensor | None) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = head
        if neighbors is None:
            self.neighbors = None
        else:
            # int32 halves the table in the bundle (Gather takes int32 indices); M < 2**31 always holds here.
            self.register_buffer("neighbors", neighbors.to(torch.int32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly map of a tile batch: ``(n, 3, th, tw)`` to ``(n, 1, h, w)``."""
        out: torch.Tensor = self.head(self.embedding(x))
        return out

    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(n, 1, h, w)`` and the reweighted image score ``(n,)`` (:func:`reweighted_score`).

        Raises:
            RuntimeError: For a map-only export variant (built without the neighbour table).
        """
        if self.neighbors is None:
            raise RuntimeError("this PatchCore module was built for a map-only export: it has no image score")
        patches = self.head.patches(self.embedding(x))
        dist, index = self.head.nearest(patches)
        score = reweighted_score(patches, dist, index, self.head.bank.to(torch.float32), self.neighbors)
        return self.head.to_map(dist), score


# -- coreset --------------------------------------------------------------------------------------


def sparse_projection(dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A very sparse random projection matrix ``(dim, out_dim)`` (Li, Hastie and Church, 2006).

    Entries are ``+-sqrt(s / out_dim)`` with probability ``1 / (2 s)`` each and
    0 otherwise, ``s = sqrt(dim)``: squared distances are preserved in expectation.
    """
    gen = torch.Generator().manual_seed(seed)
    s = max(1.0, math.sqrt(dim))
    u = torch.rand(dim, out_dim, generator=gen)
    signs = torch.where(u < 0.5 / s, -1.0, torch.where(u < 1.0 / s, 1.0, 0.0))
    return signs * math.sqrt(s / out_dim)


def greedy_coreset(
    features: torch.Tensor, size: int, *, projection_dim: int = 0, seed: int = 0, progress: bool = False
) -> tuple[torch.Tensor, float]:
    """Greedy k-center subset: each step adds the point farthest from the selected ones.

    The result covers every point within twice the optimal k-center radius.
    Distances are measured after :func:`sparse_projection` when
    ``0 < projection_dim < D``. The loop runs on one torch thread: each step
    is a matrix-vector product plus a few element-wise passes over ``N``
    values, too small to gain from threads, and on this project's shared
    2-core machine two threads made each step about 5-10x slower (measured).

    Args:
        features: float32 ``(N, D)``.
        size: Points to select, ``1..N``.
        projection_dim: Projected dimension (0: none).
        seed: Seed of the projection and of the first point.
        progress: Show a progress bar.

    Returns:
        ``(indices, radius)``: int64 ``(size,)`` distinct indices in selection
        order, and the covering radius (max distance of a point to its nearest
        selected one, in the measured space).

    Raises:
        ValueError: For an empty input or a size outside ``1..N``.
    """
    n, d = int(features.shape[0]), int(features.shape[1])
    if n == 0:
        raise ValueError("coreset: no features")
    if not 1 <= size <= n:
        raise ValueError(f"coreset: size must be in 1..{n}, got {size}")
    z = features.to(torch.float32)
    if 0 < projection_dim < d:
        z = z @ sparse_projection(d, projection_dim, seed)
    z = z.contiguous()
    sq = (z * z).sum(dim=1)
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(size, dtype=torch.int64)
    chosen[0] = first
    # Squared distance of every point to its nearest selected point.
    min_d = (sq - 2.0 * torch.mv(z, z[first]) + sq[first]).clamp_min_(0.0)
    buf = torch.empty_like(min_d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _greedy_loop(z, sq, min_d, buf, chosen, progress)
    finally:
        torch.set_num_threads(threads)
    return chosen, float(min_d.clamp_min(0.0).max().sqrt())


def _greedy_loop(
    z: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, buf: torch.Tensor, chosen: torch.Tensor, progress: bool
) -> None:
    """Fill ``chosen[1:]`` greedily, updating ``min_d`` (squared distances to the selection) in place."""
    size = int(chosen.numel())
    with tqdm(total=size, desc="coreset", unit="pt", leave=False, disable=not progress) as bar:
        bar.update(1)
        for i in range(1, size):
            j = int(torch.argmax(min_d))
            chosen[i] = j
            torch.mv(z, z[j], out=buf)
            buf.mul_(-2.0).add_(sq).add_(sq[j])
            torch.minimum(min_d, buf, out=min_d)
            min_d[j] = 0.0
            bar.update(1)


def bank_neighbors(bank: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` entries nearest to every bank entry, the entry itself first.

    Args:
        bank: float32 ``(M, D)``.
        count: Neighbours per entry (clipped to ``M``).

    Returns:
        int64 ``(M, min(count, M))``.
    """
    m = int(bank.shape[0])
    b = min(count, m)
    out = torch.empty(m, b, dtype=torch.int64)
    sq = (bank * bank).sum(dim=1)
    for lo in range(0, m, _NEIGHBOR_CHUNK):
        hi = min(lo + _NEIGHBOR_CHUNK, m)
        d2 = sq[lo:hi, None] - 2.0 * bank[lo:hi] @ bank.T + sq[None, :]
        d2[torch.arange(hi - lo), torch.arange(lo, hi)] = -1.0  # the entry itself first, even with duplicates
        out[lo:hi] = torch.topk(d2, b, dim=1, largest=False).indices
    return out
