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
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tilead.runtime import SeamSmoothing, TileGrid
from tilead.trainer.data import DataConfig

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """An invalid configuration; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AssignmentConfig(_Section):
    """Which locations share a model (:mod:`tilead.trainer.assignment`).

    Written as a mapping (``{mode: cluster, k: 4}``) or, for modes without a
    parameter, as the mode alone (``assignment: all_to_one``).

    Attributes:
        mode: ``one_to_one`` (a model per location) | ``all_to_one`` |
            ``neighbourhood`` (blocks of ``k x k`` locations) | ``cluster``
            (k-means over per-location mean embeddings, ``k`` clusters, seeded
            by ``seed``). ``retrieve`` is refused with the reason.
        k: Block side (``neighbourhood``) or number of clusters (``cluster``).
    """

    mode: Literal["one_to_one", "all_to_one", "neighbourhood", "cluster", "retrieve"] = "one_to_one"
    k: int | None = Field(default=None, ge=1, le=4096)

    @model_validator(mode="after")
    def _mode(self) -> AssignmentConfig:
        from tilead.trainer.assignment import RETRIEVE_REFUSAL

        if self.mode == "retrieve":
            raise ValueError(RETRIEVE_REFUSAL)
        if self.mode in ("neighbourhood", "cluster") and self.k is None:
            raise ValueError(f"mode {self.mode!r} needs k (an integer >= 1)")
        if self.mode not in ("neighbourhood", "cluster") and self.k is not None:
            raise ValueError(f"mode {self.mode!r} takes no k (got {self.k}); k is for neighbourhood and cluster")
        return self


class GridConfig(_Section):
    """The tile grid over the (possibly resized) image.

    Attributes:
        tile_size: Tile ``(height, width)`` or one int.
        stride: Tile origin step; defaults to the tile size (no overlap).
        edge: ``shift`` | ``pad`` | ``resize`` (see DESIGN.md).
        assignment: Which locations share a model (default: one per location).
    """

    tile_size: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    edge: Literal["shift", "pad", "resize"] = "shift"
    assignment: AssignmentConfig = AssignmentConfig()

    @field_validator("assignment", mode="before")
    @classmethod
    def _assignment_shorthand(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v

    def build(self, image_size: tuple[int, int]) -> TileGrid:
        """The :class:`TileGrid` over images of ``image_size``.

        Raises:
            ConfigError: If the grid does not fit the images, or the assignment
                does not fit the grid (a neighbourhood larger than the grid, more clusters than locations).
        """
        from tilead.trainer.assignment import AssignmentError, check_assignment

        try:
            grid = TileGrid(image_size, self.tile_size, self.stride, self.edge)
        except ValueError as err:
            raise ConfigError(f"grid: {err} (image size {image_size[0]}x{image_size[1]})") from err
        try:
            check_assignment(self.assignment.mode, self.assignment.k, grid)
        except AssignmentError as err:
            raise ConfigError(f"{err} (image size {image_size[0]}x{image_size[1]})") from None
        return grid


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


class _DetectorSection(_Section):
    """Settings every detector has (each family's section extends it).

    Attributes:
        family: Detector family; selects the section and the detector
            (``tilead.trainer.detectors``).
        backbone: Feature extractor.
        feature_stride: Output stride of the anomaly map (input px per map px).
        blur_sigma: Gaussian blur of each tile's map, in map pixels.
    """

    family: str
    backbone: BackboneConfig = BackboneConfig()
    feature_stride: Literal[4, 8, 16] = 8
    blur_sigma: float = Field(default=0.0, ge=0, le=8)


class PadimConfig(_DetectorSection):
    """PaDiM (``family: padim``, the default when ``family`` is omitted).

    Attributes:
        n_features: Random channel subset size.
        covariance_eps: Covariance regularization.
        storage_dtype: dtype of the stored inverse covariances.
    """

    family: Literal["padim"] = "padim"
    n_features: int = Field(default=100, ge=1, le=4096)
    covariance_eps: float = Field(default=0.01, gt=0)
    storage_dtype: Literal["float16", "float32"] = "float16"


class PatchCoreConfig(_DetectorSection):
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


class StfpmConfig(_DetectorSection):
    """STFPM (``family: stfpm``): a student network per location trained to match the frozen teacher.

    Attributes:
        backbone: The pretrained teacher; the student is a randomly
            initialised copy of its truncated graph, and ``layers`` are the
            matched stages.
        reduction: How the per-stage maps combine: ``product`` (the paper) or ``sum``.
        epochs: Most training epochs per location.
        optimizer: ``adam`` or ``sgd`` (with ``momentum``, the paper's choice).
        learning_rate: Step size.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay.
        batch_size: Tiles per optimisation step.
        holdout_fraction: Fraction of the fit images held out for early
            stopping (0: none; every epoch runs and the last one is kept).
        patience: Epochs without a lower held-out loss before training stops
            (0: never early; with a holdout the best epoch is still kept).
        min_delta: Smallest decrease of the held-out loss that counts as better.
        cache_mib: Keep a location's tiles and teacher features in memory when
            they fit in this many MiB (shuffled every epoch); above it tiles
            are re-read and the teacher re-run every epoch, in file order.
    """

    family: Literal["stfpm"] = "stfpm"
    blur_sigma: float = Field(default=2.0, ge=0, le=8)
    reduction: Literal["product", "sum"] = "product"
    epochs: int = Field(default=10, ge=1, le=10_000)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    batch_size: int = Field(default=4, ge=1, le=1024)
    holdout_fraction: float = Field(default=0.1, ge=0, lt=1)
    patience: int = Field(default=2, ge=0, le=10_000)
    min_delta: float = Field(default=0.0, ge=0)
    cache_mib: int = Field(default=2048, ge=0)

    @model_validator(mode="after")
    def _early_stopping(self) -> StfpmConfig:
        if self.patience > 0 and self.holdout_fraction == 0:
            raise ValueError(
                f"patience {self.patience} needs held-out tiles: set holdout_fraction > 0 "
                "(or patience 0 to train every epoch)"
            )
        return self


# One section per detector family, selected by ``family``. A new detector adds its section here.
ModelConfig = Annotated[
    PadimConfig | PatchCoreConfig | StfpmConfig,
    Field(discriminator="family"),
]
DEFAULT_FAMILY = "padim"


def model_sections() -> dict[str, type[_DetectorSection]]:
    """Config section class of every detector family."""
    members = get_args(get_args(ModelConfig)[0])
    return {m.model_fields["family"].default: m for m in members}


class TrainConfig(_Section):
    """Fitting.

    Attributes:
        batch_size: Images per batch.
        workers: Locations fitted in parallel (processes; ``backend: local``).
        threads: Torch threads in total (default: all cores).
        backend: ``local`` (this machine: in process, or ``workers`` processes) or
            ``ray`` (one Ray task per location, see :mod:`tilead.trainer.distributed`).
        ray_address: Ray cluster to join (``auto``, ``HOST:6379``); None starts a local one.
        task_cpus: CPUs each Ray task asks for (its torch threads).
        max_retries: Ray retries of a location's task whose worker died.
    """

    batch_size: int = Field(default=8, ge=1, le=1024)
    workers: int = Field(default=1, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=1024)
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    task_cpus: int = Field(default=1, ge=1, le=1024)
    max_retries: int = Field(default=3, ge=0, le=100)


class PostprocessConfig(_Section):
    """Merging and normalization, as the runtime runs them.

    Attributes:
        weights: Blending of overlapping tiles.
        seam: Seam smoothing (``sigma: 0`` disables it).
        normalization: Stage ``image`` | ``tile`` | ``none``.
        image_score: ``max``: the max of the final map (every detector);
            ``detector``: the detector's own image score (PatchCore's
            reweighted nearest-neighbour score), max over the image's tiles.
            With ``detector`` the exported graphs get a second output
            ``score`` and the validation statistics normalize that score.
    """

    weights: Literal["uniform", "feather"] = "uniform"
    seam: dict[str, float] = Field(default_factory=lambda: {"sigma": 2.0, "width": 0.1})
    normalization: Literal["image", "tile", "none"] = "image"
    image_score: Literal["max", "detector"] = "max"

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
            name), ``holdout`` (a seeded fraction of the good training
            images, not used for fitting; thresholds from a quantile of their
            scores) or ``synthetic`` (the same held-out good images, plus
            synthetic defects drawn into copies of them by
            :mod:`tilead.synthesis`; F1-adaptive thresholds). ``holdout`` and
            ``synthetic`` hold out the same images, so a fitted run can be
            re-validated with the other one (``--resume --set validation.split=...``).
        holdout_fraction: Fraction held out for ``holdout`` / ``synthetic``.
        good_quantile: Threshold quantile of good scores when the split has
            no anomalies (F1-adaptive thresholds need anomalies).
        synthetic_per_image: ``synthetic``: defective copies made from each held-out image.
        synthetic_kinds: ``synthetic``: defect kinds to draw (default: all of ``tilead.synthesis.KINDS``).
        synthetic_examples: ``synthetic``: defective examples (image and mask PNGs) saved under
            ``RUN/synthetic_examples`` for a person to look at.
        min_images: Fewest validation images (good ones for ``holdout`` / ``synthetic``) thresholds
            may come from; fewer is refused unless ``force``.
        force: Accept thresholds from fewer than ``min_images`` images (a warning is recorded).
        target_false_alarm: ``synthetic``: the image threshold is never below the held-out good scores'
            bound at this false-alarm rate on new good parts (split-conformal; with ``n`` held-out images
            the largest score bounds it by ``1 / (n + 1)``); see ``docs/good_only.md``.
        pixel_false_positive: ``synthetic``: when the F1-adaptive pixel threshold sits within the held-out
            good pixels' range (set by false positives on good background, not by the defects), it is capped
            at their ``1 - pixel_false_positive`` quantile (stages ``image`` / ``none``); see
            ``docs/good_only.md``.
    """

    split: Literal["same_as_test", "holdout", "synthetic"] = "same_as_test"
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1)
    good_quantile: float = Field(default=0.99, gt=0, le=1)
    synthetic_per_image: int = Field(default=2, ge=1, le=100)
    synthetic_kinds: tuple[str, ...] | None = None
    synthetic_examples: int = Field(default=6, ge=0, le=1000)
    min_images: int = Field(default=10, ge=1)
    force: bool = False
    target_false_alarm: float = Field(default=0.05, gt=0, lt=1)
    pixel_false_positive: float = Field(default=0.001, gt=0, lt=1)

    @field_validator("synthetic_kinds")
    @classmethod
    def _kinds(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from tilead.synthesis import KINDS

        if v is None:
            return v
        if not v:
            raise ValueError(f"expected at least one of {', '.join(KINDS)} (or null for all)")
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; expected some of {', '.join(KINDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} lists a kind twice")
        return v


class EvalConfig(_Section):
    """Evaluation.

    Attributes:
        batch_size: Images per inference batch.
        overlays: Number of overlay PNGs to write.
        fpr_limit: AUPRO integration limit.
        resolution: ``original``: maps are upsampled to the images' original
            size and compared with the original masks (the fair comparison
            for downscaled configs; images of different sizes are each judged
            at their own size, pixel metrics pooling all pixels); ``model``: at
            the configured ``data.image_size``. The same when images are not resized.
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
    model: ModelConfig = PadimConfig()
    train: TrainConfig = TrainConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _default_family(cls, v: Any) -> Any:
        if isinstance(v, dict) and "family" not in v:
            return {"family": DEFAULT_FAMILY, **v}
        return v

    @model_validator(mode="after")
    def _image_score(self) -> RunConfig:
        if self.postprocess.image_score == "detector":
            from tilead.trainer.detectors import detector_class, families

            if not detector_class(self.model.family).has_image_score:
                own = [f for f in families() if detector_class(f).has_image_score]
                raise ValueError(
                    f"postprocess.image_score 'detector': model.family {self.model.family!r} has no image score "
                    f"of its own; use 'max' (detectors with one: {', '.join(own)})"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data

    def fit_key(self) -> str:
        """Hash of everything a fitted location depends on (resume checks it)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("seed", "data", "grid", "model")}
        if keep["grid"].get("assignment") == {"mode": "one_to_one", "k": None}:
            del keep["grid"]["assignment"]  # runs fitted before task assignment existed keep their key
        if d["validation"]["split"] in ("holdout", "synthetic"):  # the same images held out
            keep["holdout"] = d["validation"]["holdout_fraction"]
        keep["data"].pop("max_test_images", None)
        keep["data"].pop("mask_template", None)  # masks never enter fitting (and runs fitted before it keep their key)
        blob = json.dumps(keep, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s))"]
    sections = model_sections()
    for e in err.errors():
        path = tuple(e["loc"])
        family: str | None = None
        if len(path) > 1 and path[0] == "model" and path[1] in sections:
            family = str(path[1])  # the union's tag (the section's family), not a key of the file
            path = (path[0], *path[2:])
        loc = ".".join(str(p) for p in path) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(path[:-1], family)
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _allowed_keys(path: tuple[int | str, ...], family: str | None = None) -> list[str]:
    model: Any = RunConfig
    for part in path:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
        if model in (ModelConfig, get_args(ModelConfig)[0]):
            model = model_sections().get(family or DEFAULT_FAMILY)
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
