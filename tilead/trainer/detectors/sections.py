"""The ``model`` config section of every detector family, and the registry that finds them.

Each family package ``tilead.trainer.detectors.<family>`` holds a ``config``
module whose pydantic section (a :class:`DetectorSection` subclass with a
``family`` literal) is decorated with :func:`register_section`. The run config
(:mod:`tilead.trainer.config`) asks :func:`section_class` for the section of a
``model.family``, so a new family needs no edit of ``config.py``.

This module and the families' ``config`` modules import neither torch nor the
trainer's other modules: loading a config stays cheap.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tilead.trainer.detectors.registry import add_family, discover_families

DEFAULT_FAMILY = "padim"  # the family of a ``model`` section without ``family``


class BackboneConfig(BaseModel):
    """Feature extractor.

    Attributes:
        name: ``efficientnet_lite0`` | ``timm:<model>`` | ``torchvision:<model>``.
        weights: ``default`` (efficientnet_lite0's packaged ImageNet weights),
            a local state-dict file, or ``none`` (random; warns loudly).
        layers: Graph nodes whose outputs are the features.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "efficientnet_lite0"
    weights: str = "default"
    layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.3")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v != "efficientnet_lite0" and not v.startswith(("timm:", "torchvision:")):
            raise ValueError(f"expected 'efficientnet_lite0', 'timm:<model>' or 'torchvision:<model>', got {v!r}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("expected at least one layer")
        return v


class ThumbnailConfig(BaseModel):
    """The thumbnail branch (issue #20): one more model of the run's family on whole images, downscaled.

    Attributes:
        size: Side of the square every whole image is resized to (area resize, as training resizes).
        fusion: ``max`` of the two per-branch normalized maps, or ``weighted``: ``w * tiled + (1 - w) *
            thumbnail`` with ``w`` from ``weights`` chosen on the validation images (it needs anomalous ones).
        weights: Candidate weights of the tiled branch for ``weighted``.
        blur: Gaussian blur of the thumbnail's map: ``model`` (the model's ``blur_sigma`` in thumbnail-map
            pixels, much wider in image pixels than the tiles' blur), ``matched`` (the tiles' blur in image
            pixels: ``blur_sigma * size / max(image height, width)`` thumbnail-map pixels) or a sigma in
            thumbnail-map pixels (0: none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=32, le=4096)
    fusion: Literal["max", "weighted"] = "max"
    weights: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
    blur: Literal["model", "matched"] | Annotated[float, Field(ge=0, le=8)] = "model"

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= w <= 1.0 for w in v):
            raise ValueError(f"expected one or more weights in [0, 1], got {list(v)}")
        return tuple(sorted(set(v)))


class DetectorSection(BaseModel):
    """Settings every detector has (each family's section extends it).

    Attributes:
        family: Detector family; selects the section and the detector
            (``tilead.trainer.detectors``).
        backbone: Feature extractor.
        feature_stride: Output stride of the anomaly map (input px per map px).
        blur_sigma: Gaussian blur of each tile's map, in map pixels.
        thumbnail: The thumbnail branch (:class:`ThumbnailConfig`), or None (off).

    Class attributes:
        has_image_score: The family's modules have an image score of their own
            (``postprocess.image_score: detector`` is allowed only then).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    has_image_score: ClassVar[bool] = False

    family: str
    backbone: BackboneConfig = BackboneConfig()
    feature_stride: Literal[4, 8, 16] = 8
    blur_sigma: float = Field(default=0.0, ge=0, le=8)
    thumbnail: ThumbnailConfig | None = None


_SECTIONS: dict[str, type[DetectorSection]] = {}
_S = TypeVar("_S", bound=type[DetectorSection])


def register_section(cls: _S) -> _S:
    """Class decorator: the ``model`` section of the family its ``family`` field defaults to.

    Raises:
        ValueError: If the section has no string ``family`` default, or another class registered that family.
    """
    section: type[DetectorSection] = cls
    family = section.model_fields["family"].default
    if not isinstance(family, str) or not family:
        raise ValueError(f"{cls.__name__}: a detector section needs a 'family' field with a non-empty default")
    add_family(_SECTIONS, family, section, "config section of family")
    return cls


def _discover() -> None:
    """Import the ``config`` module of every family package (each registers its section)."""
    discover_families("config")


def model_sections() -> dict[str, type[DetectorSection]]:
    """Config section class of every detector family, by family name (sorted)."""
    _discover()
    return {family: _SECTIONS[family] for family in sorted(_SECTIONS)}


def section_class(family: str) -> type[DetectorSection]:
    """The config section registered for ``family``.

    Raises:
        KeyError: For an unknown family (the message lists the known ones).
    """
    if family not in _SECTIONS:
        _discover()
    if family not in _SECTIONS:
        raise KeyError(f"unknown detector family {family!r}; known: {', '.join(sorted(_SECTIONS))}")
    return _SECTIONS[family]
