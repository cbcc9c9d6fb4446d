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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tilead.runtime import EdgePolicy, NormalizationStats, PostProcessor, SeamSmoothing, TileGrid, parse_seam
from tilead.runtime.postprocessor import STAGES, NormalizationStage
from tilead.trainer.data import DataConfig
from tilead.trainer.detectors.sections import DEFAULT_FAMILY, DetectorSection, model_sections, section_class

SCHEMA_VERSION = 1
NORMALIZATION_DOC = "docs/hires.md, section 'Normalization with shared models'"
"""Where the measurements behind ``postprocess.normalization: auto`` are (named in the warning)."""


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
        orient: ``cluster`` only: group locations by their mean tile after the best of the 8 flips /
            quarter turns, and fit each shared model on its locations' tiles brought into that orientation
            (:mod:`tilead.runtime.orientation`; docs/hires.md).
    """

    mode: Literal["one_to_one", "all_to_one", "neighbourhood", "cluster", "retrieve"] = "one_to_one"
    k: int | None = Field(default=None, ge=1, le=4096)
    orient: bool = False

    @model_validator(mode="after")
    def _mode(self) -> AssignmentConfig:
        from tilead.trainer.assignment import RETRIEVE_REFUSAL

        if self.mode == "retrieve":
            raise ValueError(RETRIEVE_REFUSAL)
        if self.mode in ("neighbourhood", "cluster") and self.k is None:
            raise ValueError(f"mode {self.mode!r} needs k (an integer >= 1)")
        if self.mode not in ("neighbourhood", "cluster") and self.k is not None:
            raise ValueError(f"mode {self.mode!r} takes no k (got {self.k}); k is for neighbourhood and cluster")
        if self.orient and self.mode != "cluster":
            raise ValueError(f"orient: only mode 'cluster' takes orient (got mode {self.mode!r})")
        return self

    @property
    def groups_from_data(self) -> bool:
        """Whether the groups of locations sharing a model are made from the data: ``cluster`` with ``k >= 2``.

        k-means groups can differ in size (demo2048 ``cluster_oriented``: two lone locations beside groups of 9
        and 5) or not (bottle 4x4 ``cluster_oriented``: four groups of 4); they are known once the fit has made
        them (``assignment.json``). ``neighbourhood`` blocks are fixed by the grid, and ``all_to_one`` (or
        ``cluster`` with ``k: 1``) has one model.
        """
        return self.mode == "cluster" and self.k is not None and self.k >= 2

    def default_normalization(self, group_sizes: Sequence[int] | None = None) -> Literal["image", "tile"] | None:
        """What ``postprocess.normalization: auto`` becomes.

        For groups made from the data (:attr:`groups_from_data`): ``tile`` when the models serve different
        numbers of locations, ``image`` when they all serve the same number, and None while the sizes are not
        known (before the fit). Every other assignment: ``image`` (``group_sizes`` is not needed).

        Models fitted on different numbers of locations score on different scales, and one image-wide
        normalization then lets the highest-scoring model decide every image (bottle 4x4 ``cluster``, groups
        of 4, 5, 3 and 4: AUPRO 0.5421 with ``image`` against 0.8819 with ``tile``; demo2048's unequal
        clusters likewise). Where the models serve equal numbers, the measured rows were as good or better with
        ``image`` (``neighbourhood``, demo2048 ``all_to_one``, bottle 4x4 ``cluster_oriented``: AUPRO 0.9517
        against 0.8947); bottle 4x4 ``all_to_one`` is the one measured exception. Measurements:
        :data:`NORMALIZATION_DOC`.

        Args:
            group_sizes: Locations served by each model (the fitted run's ``assignment.json``).
        """
        if not self.groups_from_data:
            return "image"
        if group_sizes is None:
            return None
        return "tile" if len(set(group_sizes)) > 1 else "image"


class GridConfig(_Section):
    """The tile grid over the (possibly resized) image.

    Attributes:
        tile_size: Tile ``(height, width)`` or one int.
        stride: Tile origin step; defaults to the tile size (no overlap).
        edge: One of the runtime's ``EDGE_POLICIES``: ``shift`` | ``pad`` | ``resize`` (see DESIGN.md).
        assignment: Which locations share a model (default: one per location).
    """

    tile_size: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    edge: EdgePolicy = "shift"  # the Literal of EDGE_POLICIES: the extension's one list
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
        normalization: Stage ``image`` | ``tile`` | ``none``, or ``auto`` (the default): ``tile`` (each
            location's map normalized with its own validation statistics) where the models serve different
            numbers of locations, else ``image`` (:meth:`AssignmentConfig.default_normalization`).
            :class:`RunConfig` resolves it when the config is validated, except for ``grid.assignment``
            ``cluster`` with ``k >= 2``, whose group sizes come from the data: training resolves it once the
            fit has made the clusters and saves the run config again. ``stats.json``, bundles and the config
            of a trained run never hold ``auto``.
        image_score: ``max``: the max of the final map (every detector);
            ``detector``: the detector's own image score (PatchCore's
            reweighted nearest-neighbour score), max over the image's tiles.
            With ``detector`` the exported graphs get a second output
            ``score`` and the validation statistics normalize that score.
    """

    weights: Literal["uniform", "feather"] = "uniform"
    seam: dict[str, float] = Field(default_factory=lambda: {"sigma": 2.0, "width": 0.1})
    normalization: Literal["auto", "image", "tile", "none"] = "auto"
    image_score: Literal["max", "detector"] = "max"

    @field_validator("seam")
    @classmethod
    def _seam(cls, v: dict[str, float]) -> dict[str, float]:
        parse_seam(v)  # the runtime's one parser: ValueError for bad keys or values
        return SeamSmoothing.from_dict(v).to_dict()

    def seam_smoothing(self) -> SeamSmoothing | None:
        """The runtime settings, or None: off (``sigma: 0`` or ``width: 0``)."""
        return parse_seam(self.seam)

    @property
    def stage(self) -> NormalizationStage:
        """The resolved stage (``image``, ``tile`` or ``none``).

        Raises:
            ValueError: For ``auto``: a section built alone (only :class:`RunConfig` resolves it), or a
                ``cluster`` run's before training has made its clusters.
        """
        for stage in STAGES:
            if self.normalization == stage:
                return stage
        raise ValueError(
            "postprocess.normalization 'auto' is resolved from grid.assignment when the whole run config is "
            "validated (RunConfig), and for clusters (cluster with k >= 2) once training has made them; this "
            "section has no stage yet: give image, tile or none"
        )

    def processor(self, grid: TileGrid, stats: NormalizationStats | None = None) -> PostProcessor:
        """The runtime's post-processing object for this section (:meth:`PostProcessor.from_config`).

        An unresolved ``auto`` (a section built alone, outside :class:`RunConfig`) is left out: the stage is
        then that of ``stats``, and merging without statistics does not depend on it.
        """
        section = self.model_dump()
        if section["normalization"] == "auto":
            del section["normalization"]
        return PostProcessor.from_config(section, grid, stats)


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
        model: Detector: the section registered for ``model.family``
            (:mod:`tilead.trainer.detectors.sections`; ``padim`` when omitted).
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
    model: SerializeAsAny[DetectorSection] = Field(
        default_factory=lambda: section_class(DEFAULT_FAMILY).model_validate({"family": DEFAULT_FAMILY})
    )
    train: TrainConfig = TrainConfig()
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig, validate_default=True)
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _family_section(cls, v: Any) -> Any:
        """Validate a ``model`` mapping with its family's registered section (``padim`` when omitted)."""
        if not isinstance(v, dict):
            return v  # a section object, or a type error reported by pydantic
        family = v.get("family", DEFAULT_FAMILY)
        sections = model_sections()
        if not isinstance(family, str) or family not in sections:
            raise PydanticCustomError(
                "union_tag_invalid",
                "Input tag {tag} found using 'family' does not match any of the expected tags: {expected_tags}",
                {"tag": repr(family), "expected_tags": ", ".join(repr(f) for f in sections)},
            )
        return sections[family].model_validate({"family": family, **v})

    @field_validator("postprocess", mode="after")
    @classmethod
    def _resolve_normalization(cls, v: PostprocessConfig, info: ValidationInfo) -> PostprocessConfig:
        """``normalization: auto`` -> ``tile`` or ``image`` from ``grid.assignment`` (validated before it).

        ``auto`` stays for clusters made from the data (their sizes are known at fit time: training resolves it).
        """
        grid = info.data.get("grid")
        if v.normalization != "auto" or not isinstance(grid, GridConfig):
            return v  # an invalid grid is reported on its own key
        stage = grid.assignment.default_normalization()
        return v if stage is None else v.model_copy(update={"normalization": stage})

    def with_normalization(self, stage: NormalizationStage) -> RunConfig:
        """This config with ``postprocess.normalization`` set to ``stage`` (training's fit-time ``auto``)."""
        return self.model_copy(update={"postprocess": self.postprocess.model_copy(update={"normalization": stage})})

    def image_normalization_warning(self, group_sizes: Sequence[int] | None = None) -> str | None:
        """The warning for ``normalization: image`` where ``auto`` would pick ``tile``, or None.

        Only an explicit ``image`` (or a saved run config that has it) gets here, for clusters whose models
        serve different numbers of locations: so it needs ``group_sizes`` (the fitted run's groups; None
        before the fit: no warning yet).
        """
        a = self.grid.assignment
        if self.postprocess.normalization != "image" or a.default_normalization(group_sizes) != "tile":
            return None
        sizes = ", ".join(str(n) for n in group_sizes or ())
        return (
            f"postprocess.normalization 'image' with grid.assignment cluster (k {a.k}"
            f"{', orient' if a.orient else ''}): the clusters made from the data serve different numbers of "
            f"tile locations ({sizes}); such models score on different scales, so one image-wide "
            "normalization lets the highest-scoring model decide every image (measured: demo2048 "
            "cluster_oriented image AUROC 0.2000 with 'image' "
            "against 1.0000 with 'tile', bottle 4x4 cluster AUPRO 0.5421 against 0.8819; "
            f"{NORMALIZATION_DOC}). Use 'tile' (per-location statistics): drop the key (the default 'auto' "
            "picks 'tile' for clusters of unequal sizes) or set postprocess.normalization: tile; a fitted run is "
            "validated again without refitting with --resume --set postprocess.normalization=tile"
        )

    @model_validator(mode="after")
    def _thumbnail(self) -> RunConfig:
        thumb = self.model.thumbnail
        if thumb is None:
            return self
        if self.postprocess.image_score == "detector":
            raise ValueError(
                "model.thumbnail: the thumbnail branch fuses anomaly maps; it does not go with "
                "postprocess.image_score 'detector' (use 'max', or drop model.thumbnail)"
            )
        if thumb.fusion == "weighted" and self.validation.split == "holdout":
            raise ValueError(
                "model.thumbnail.fusion 'weighted': the weight is chosen on anomalous validation images, and "
                "validation.split 'holdout' has none; use fusion 'max', or validation.split synthetic / same_as_test"
            )
        return self

    @model_validator(mode="after")
    def _image_score(self) -> RunConfig:
        if self.postprocess.image_score == "detector" and not type(self.model).has_image_score:
            own = [f for f, section in model_sections().items() if section.has_image_score]
            raise ValueError(
                f"postprocess.image_score 'detector': model.family {self.model.family!r} has no image score "
                f"of its own; use 'max' (detectors with one: {', '.join(own)})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data

    def thumbnail_key(self) -> str:
        """Hash of everything the thumbnail model depends on: :meth:`fit_key` and the thumbnail size."""
        size = None if self.model.thumbnail is None else self.model.thumbnail.size
        blob = json.dumps({"fit_key": self.fit_key(), "thumbnail_size": size}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fit_key(self) -> str:
        """Hash of everything a fitted location depends on (resume checks it)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("seed", "data", "grid", "model")}
        keep["model"].pop("thumbnail", None)  # the thumbnail model has its own key (thumbnail_key); tiles do not change
        if keep["grid"].get("assignment", {}).get("orient") is False:
            del keep["grid"]["assignment"]["orient"]  # runs fitted before orient existed keep their key
        if keep["grid"].get("assignment") == {"mode": "one_to_one", "k": None}:
            del keep["grid"]["assignment"]  # runs fitted before task assignment existed keep their key
        if d["validation"]["split"] in ("holdout", "synthetic"):  # the same images held out
            keep["holdout"] = d["validation"]["holdout_fraction"]
        keep["data"].pop("max_test_images", None)
        keep["data"].pop("mask_template", None)  # masks never enter fitting (and runs fitted before it keep their key)
        blob = json.dumps(keep, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str, data: dict[str, Any]) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s))"]
    model = data.get("model")
    family = model.get("family") if isinstance(model, dict) else None
    for e in err.errors():
        path = tuple(e["loc"])
        loc = ".".join(str(p) for p in path) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(path[:-1], family if isinstance(family, str) else None)
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _allowed_keys(path: tuple[int | str, ...], family: str | None = None) -> list[str]:
    model: Any = RunConfig
    for part in path:
        if model is RunConfig and part == "model":  # the family's registered section
            model = model_sections().get(family or DEFAULT_FAMILY)
            continue
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
        raise ConfigError(_format_errors(err, source, data)) from None
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
