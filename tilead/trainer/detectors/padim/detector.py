"""PaDiM behind the detector interface (the math lives in :mod:`tilead.trainer.detectors.padim.model`)."""

from __future__ import annotations

from typing import Any

import torch

from tilead.trainer.backbones import BackboneInfo
from tilead.trainer.detectors.base import Detector, LocationModel, LocationState, TileSource, iterate, register
from tilead.trainer.detectors.padim.model import (
    Embedding,
    PadimAccumulator,
    PadimSettings,
    build_location_model,
    channel_subset,
    state_tensors,
)
from tilead.trainer.maps import check_strides

HEAD_BLOCKS = 4  # block rows of the exported Mahalanobis form (BlockRowPadimHead); 62.5 % of the matrix bytes


def padim_settings(settings: Any, seed: int) -> PadimSettings:
    """The :class:`PadimSettings` of a ``model`` config section (``family: padim``)."""
    return PadimSettings(
        feature_stride=settings.feature_stride,
        n_features=settings.n_features,
        eps=settings.covariance_eps,
        blur_sigma=settings.blur_sigma,
        storage_dtype=settings.storage_dtype,
        seed=seed,
    )


@register
class PadimDetector(Detector):
    """PaDiM (Defard et al., 2021): a Gaussian per map position, Mahalanobis distance map.

    State tensors: ``mean`` float32 ``(P, d)``, ``inv_cov`` ``(P, d, d)`` in
    ``storage_dtype``, ``channel_index`` int64 ``(d,)`` with ``P = h * w``.
    """

    family = "padim"
    state_format = "tilead.padim.v1"

    @property
    def padim(self) -> PadimSettings:
        """The math module's settings."""
        return padim_settings(self.settings, self.seed)

    @staticmethod
    def check_backbone(info: BackboneInfo, settings: Any) -> None:
        """Every layer stride must divide or be a multiple of ``feature_stride``."""
        check_strides(info.strides, settings.feature_stride)

    def fit(self, fit: TileSource, holdout: TileSource, *, progress: bool = True) -> LocationState:
        """Accumulate the per-position moments over one pass of ``fit`` (``holdout`` is unused)."""
        s = self.padim
        size = self.map_size
        index = channel_subset(sum(self.backbone.info.channels), s.n_features, s.seed)
        embed = Embedding(self.backbone, s.feature_stride, index, size)
        acc = PadimAccumulator(size[0] * size[1], s.n_features)
        with torch.inference_mode():
            for tiles in iterate(fit, progress=progress):
                acc.update(embed(tiles))
        mean, inv_cov = acc.finalize(s.eps)
        return LocationState(state_tensors(mean, inv_cov, index, s.storage_dtype), {}, acc.count)

    def build(self, state: LocationState, *, export: bool = False, with_score: bool = False) -> LocationModel:
        """Plain head for eager use; block-row head (:data:`HEAD_BLOCKS`) for export."""
        return build_location_model(
            self.backbone, state.tensors, self.tile_size, self.padim, head_blocks=HEAD_BLOCKS if export else None
        )

    def summary(self) -> dict[str, Any]:
        """Adds ``n_features`` and the state size per location."""
        h, w = self.map_size
        d = int(self.settings.n_features)
        elem = 2 if self.settings.storage_dtype == "float16" else 4
        positions = h * w
        return {
            **super().summary(),
            "n_features": d,
            "state_bytes_per_location": positions * d * 4 + positions * d * d * elem + d * 8,
        }

    def manifest_info(self) -> dict[str, Any]:
        """The exported Mahalanobis block count."""
        return {"mahalanobis_blocks": HEAD_BLOCKS}
