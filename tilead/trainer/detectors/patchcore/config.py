"""PatchCore's ``model`` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from tilead.trainer.detectors.sections import BackboneConfig, DetectorSection, register_section


@register_section
class PatchCoreConfig(DetectorSection):
    """PatchCore (``family: patchcore``).

    Attributes:
        backbone: Feature extractor; two stages by default (strides 8 and 16).
        local_kernel: Side of the local neighbourhood averaged into each patch
            feature (the paper's ``p``; odd).
        coreset_ratio: Memory bank size as a fraction of all fit patches of a location.
        projection_dim: Dimension of the sparse random projection the greedy
            coreset measures distances in (0: the full features).
        max_candidates: Cap on the patches the greedy coreset selects from
            (a seeded uniform subsample when a location has more).
        num_neighbors: Bank neighbours ``b`` of the image-score reweighting.
        storage_dtype: dtype of the stored memory bank.
    """

    has_image_score: ClassVar[bool] = True

    family: Literal["patchcore"] = "patchcore"
    backbone: BackboneConfig = BackboneConfig(layers=("blocks.2", "blocks.3"))
    blur_sigma: float = Field(default=2.0, ge=0, le=8)
    local_kernel: int = Field(default=3, ge=1, le=9)
    coreset_ratio: float = Field(default=0.01, gt=0, le=1)
    projection_dim: int = Field(default=32, ge=0, le=4096)
    max_candidates: int = Field(default=200_000, ge=2)
    num_neighbors: int = Field(default=9, ge=1, le=64)
    storage_dtype: Literal["float16", "float32"] = "float16"

    @field_validator("local_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"expected an odd neighbourhood size, got {v}")
        return v
