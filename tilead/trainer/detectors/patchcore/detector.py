"""PatchCore behind the detector interface (the math lives in :mod:`tilead.trainer.detectors.patchcore.model`)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from tilead.trainer.backbones import BackboneInfo
from tilead.trainer.detectors.base import Detector, LocationState, TileSource, iterate, register
from tilead.trainer.detectors.patchcore.model import (
    NearestNeighbourHead,
    PatchCoreLocationModel,
    PatchEmbedding,
    bank_neighbors,
    greedy_coreset,
)
from tilead.trainer.maps import check_strides

log = logging.getLogger("tilead.trainer")


@register
class PatchCoreDetector(Detector):
    """PatchCore: a coreset memory bank of locally aware patch features per location."""

    family = "patchcore"
    state_format = "tilead.patchcore.v1"

    @staticmethod
    def check_backbone(info: BackboneInfo, settings: Any) -> None:
        """Every layer stride must divide or be a multiple of ``feature_stride``."""
        check_strides(info.strides, settings.feature_stride)

    def embedding(self) -> PatchEmbedding:
        """The patch feature extractor of this run."""
        s = self.settings
        return PatchEmbedding(self.backbone, s.feature_stride, self.map_size, s.local_kernel)

    def fit(self, fit: TileSource, holdout: TileSource, *, progress: bool = True) -> LocationState:
        """Collect candidate patches in one pass of ``fit``, then select the coreset (``holdout`` is unused).

        Raises:
            ValueError: If ``fit`` yields no tiles.
        """
        s = self.settings
        h, w = self.map_size
        positions = h * w
        total = fit.num_images * positions
        if total == 0:
            raise ValueError("PatchCore needs at least one training tile per location")
        rng = np.random.default_rng(self.seed)
        pool = min(total, int(s.max_candidates))
        cand = np.sort(rng.choice(total, size=pool, replace=False)) if pool < total else np.arange(total)
        embed = self.embedding()
        chunks: list[torch.Tensor] = []
        offset, tiles = 0, 0
        with torch.inference_mode():
            for batch in iterate(fit, progress=progress):
                emb = embed(batch)
                n, d = int(emb.shape[0]), int(emb.shape[1])
                flat = emb.reshape(n, d, positions).transpose(1, 2).reshape(n * positions, d)
                lo, hi = np.searchsorted(cand, [offset, offset + n * positions])
                chunks.append(flat[torch.from_numpy(cand[lo:hi] - offset)].clone())
                offset += n * positions
                tiles += n
        if tiles == 0:
            raise ValueError("PatchCore needs at least one training tile per location")
        feats = torch.cat(chunks)
        patches = tiles * positions
        size = min(int(feats.shape[0]), max(1, math.ceil(s.coreset_ratio * patches)))
        start = time.perf_counter()
        index, radius = greedy_coreset(feats, size, projection_dim=s.projection_dim, seed=self.seed, progress=progress)
        seconds = time.perf_counter() - start
        bank = feats[index]
        center = bank.mean(dim=0)
        dtype = torch.float16 if s.storage_dtype == "float16" else torch.float32
        centred = (bank - center).to(dtype)
        neighbors = bank_neighbors(centred.to(torch.float32), s.num_neighbors)
        log.info(
            "coreset: %d of %d candidates (%d patches) in %.1f s, covering radius %.3f",
            size, feats.shape[0], patches, seconds, radius,
        )  # fmt: skip
        meta = {
            "patches": patches,
            "candidates": int(feats.shape[0]),
            "bank_size": size,
            "feature_dim": int(feats.shape[1]),
            "coreset_seconds": round(seconds, 3),
            "covering_radius": radius,
        }
        tensors = {"bank": centred.contiguous(), "center": center.contiguous(), "neighbors": neighbors}
        return LocationState(tensors, meta, tiles)

    def build(self, state: LocationState, *, export: bool = False, with_score: bool = False) -> PatchCoreLocationModel:
        """The location model (the same module is exported; a map-only export leaves out the neighbour table).

        Raises:
            ValueError: If the state's tensors are inconsistent with the backbone.
        """
        t = state.tensors
        try:
            bank, center, neighbors = t["bank"], t["center"], t["neighbors"]
        except KeyError as err:
            raise ValueError(f"PatchCore state: missing tensor {err}") from None
        d = sum(self.backbone.info.channels)
        if bank.ndim != 2 or int(bank.shape[1]) != d or tuple(center.shape) != (d,):
            raise ValueError(
                f"PatchCore state: expected bank (M, {d}) and center ({d},) for the backbone's layers, "
                f"got {tuple(bank.shape)} and {tuple(center.shape)}"
            )
        if neighbors.ndim != 2 or int(neighbors.shape[0]) != int(bank.shape[0]):
            raise ValueError(f"PatchCore state: neighbors {tuple(neighbors.shape)} do not match bank {bank.shape}")
        head = NearestNeighbourHead(bank, center, self.map_size, self.settings.blur_sigma)
        table = neighbors if (with_score or not export) else None
        return PatchCoreLocationModel(self.embedding(), head, table).eval()

    def summary(self) -> dict[str, Any]:
        """Adds the feature dimension and the coreset settings."""
        s = self.settings
        return {
            **super().summary(),
            "feature_dim": sum(self.backbone.info.channels),
            "coreset_ratio": s.coreset_ratio,
            "projection_dim": s.projection_dim,
            "max_candidates": s.max_candidates,
        }

    def manifest_info(self) -> dict[str, Any]:
        """Nearest-neighbour facts under ``model.detector``."""
        s = self.settings
        return {
            "detector": {
                "feature_dim": sum(self.backbone.info.channels),
                "bank_dtype": s.storage_dtype,
                "num_neighbors": s.num_neighbors,
            }
        }
