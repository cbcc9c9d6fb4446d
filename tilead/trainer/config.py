"""Training configuration: a YAML file validated by pydantic.

Every section forbids unknown keys, and a bad value is reported with its full
key path and the allowed values (:func:`load_config` turns pydantic's errors
into one readable :class:`ConfigError`). Relative data paths are resolved
against the directory of the config file, so a config works from any working
directory. ``configs/padim_bottle.yaml`` is the annotated reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tilead.runtime import SeamSmoothing, TileGrid
from tilead.trainer.data import DataConfig

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """An invalid configuration; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridConfig(_Section):
    """The tile grid over the (possibly resized) image.

    Attributes:
        tile_size: Tile ``(height, width)`` or one int.
        stride: Tile origin step; defaults to the tile size (no overlap).
        edge: ``shift`` | ``pad`` | ``resize`` (see DESIGN.md).
    """

    tile_size: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    edge: Literal["shift", "pad", "resize"] = "shift"

    def build(self, image_size: tuple[int, int]) -> TileGrid:
        """The :class:`TileGrid` over images of ``image_size``.

        Raises:
            ConfigError: If the grid does not fit the images.
        """
        try:
            return TileGrid(image_size, self.tile_size, self.stride, self.edge)
        except ValueError as err:
            raise ConfigError(f"grid: {err} (image size {image_size[0]}x{image_size[1]})") from err


class BackboneConfig(_Section):
    """Feature extractor.

    Attributes:
        name: ``efficientnet_lite0`` | ``timm:<model>`` | ``torchvision:<model>``.
        weights: ``default`` (efficientnet_lite0's packaged ImageNet weights),
            a local state-dict file, or ``none`` (random; warns loudly).
        layers: Graph nodes whose outputs are the features.
    """

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


class ModelConfig(_Section):
    """The per-location detector.

    Attributes:
        family: Detector family (``padim``).
        backbone: Feature extractor.
        feature_stride: Output stride of the anomaly map.
        n_features: Random channel subset size.
        covariance_eps: Covariance regularization.
        blur_sigma: Gaussian blur of each tile's map, in map pixels.
        storage_dtype: dtype of the stored inverse covariances.
    """

    family: Literal["padim"] = "padim"
    backbone: BackboneConfig = BackboneConfig()
    feature_stride: Literal[4, 8, 16] = 8
    n_features: int = Field(default=100, ge=1, le=4096)
    covariance_eps: float = Field(default=0.01, gt=0)
    blur_sigma: float = Field(default=0.0, ge=0, le=8)
    storage_dtype: Literal["float16", "float32"] = "float16"


class TrainConfig(_Section):
    """Fitting.

    Attributes:
        batch_size: Images per batch.
        workers: Locations fitted in parallel (processes).
        threads: Torch threads in total (default: all cores).
    """

    batch_size: int = Field(default=8, ge=1, le=1024)
    workers: int = Field(default=1, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=1024)


class PostprocessConfig(_Section):
    """Merging and normalization, as the runtime runs them.

    Attributes:
        weights: Blending of overlapping tiles.
        seam: Seam smoothing (``sigma: 0`` disables it).
        normalization: Stage ``image`` | ``tile`` | ``none``.
        image_score: Image score reduction (max of the final map).
    """

    weights: Literal["uniform", "feather"] = "uniform"
    seam: dict[str, float] = Field(default_factory=lambda: {"sigma": 2.0, "width": 0.1})
    normalization: Literal["image", "tile", "none"] = "image"
    image_score: Literal["max"] = "max"

    @field_validator("seam")
    @classmethod
    def _seam(cls, v: dict[str, float]) -> dict[str, float]:
        return SeamSmoothing.from_dict(v).to_dict()

    def seam_smoothing(self) -> SeamSmoothing | None:
        """The runtime settings, or None when disabled."""
        s = SeamSmoothing.from_dict(self.seam)
        return s if s.sigma > 0 and s.width > 0 else None


class ValidationConfig(_Section):
    """Where normalization statistics and thresholds come from.

    Attributes:
        split: ``same_as_test`` (the test set, as anomalib's option of that
            name) or ``holdout`` (a seeded fraction of the good training
            images, not used for fitting).
        holdout_fraction: Fraction held out for ``holdout``.
        good_quantile: Threshold quantile of good scores when the split has
            no anomalies (F1-adaptive thresholds need anomalies).
    """

    split: Literal["same_as_test", "holdout"] = "same_as_test"
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1)
    good_quantile: float = Field(default=0.99, gt=0, le=1)


class EvalConfig(_Section):
    """Evaluation.

    Attributes:
        batch_size: Images per inference batch.
        overlays: Number of overlay PNGs to write.
        fpr_limit: AUPRO integration limit.
        resolution: ``original``: maps are upsampled to the images' original
            size and compared with the original masks (the fair comparison
            for downscaled configs); ``model``: at the configured
            ``data.image_size``. The same when images are not resized.
    """

    batch_size: int = Field(default=4, ge=1, le=1024)
    overlays: int = Field(default=12, ge=0)
    fpr_limit: float = Field(default=0.3, gt=0, le=1)
    resolution: Literal["original", "model"] = "original"


class RunConfig(_Section):
    """A whole training run.

    Attributes:
        name: Run name (default output folder ``runs/<name>``).
        seed: Seed of every random choice.
        data: Dataset.
        grid: Tile grid.
        model: Detector.
        train: Fitting.
        postprocess: Merging and normalization.
        validation: Statistics source.
        eval: Evaluation.
    """

    schema_version: Literal[1] = 1
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    data: DataConfig
    grid: GridConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data

    def fit_key(self) -> str:
        """Hash of everything a fitted location depends on (resume checks it)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("seed", "data", "grid", "model")}
        if d["validation"]["split"] == "holdout":
            keep["holdout"] = d["validation"]["holdout_fraction"]
        keep["data"].pop("max_test_images", None)
        blob = json.dumps(keep, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _allowed_keys(path: tuple[int | str, ...]) -> list[str]:
    model: Any = RunConfig
    for part in path:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def parse_config(data: Any, *, base_dir: Path, source: str = "config") -> RunConfig:
    """Validate plain data into a :class:`RunConfig`.

    Args:
        data: The parsed YAML mapping.
        base_dir: Directory relative data paths are resolved against.
        source: Name used in error messages (the file path).

    Returns:
        The validated config, data root made absolute.

    Raises:
        ConfigError: Listing every bad key with what was expected.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return cfg.model_copy(update={"data": cfg.data.resolved(base_dir)})


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config file.

    Args:
        path: The YAML file.
        overrides: Dotted keys to replace before validation
            (e.g. ``{"data.max_train_images": 20}``).

    Returns:
        The validated config.

    Raises:
        ConfigError: For a missing or unparsable file or invalid content.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return parse_config(data, base_dir=path.resolve().parent, source=str(path))


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from tilead.trainer.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
