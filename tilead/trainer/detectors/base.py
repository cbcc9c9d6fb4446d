"""The detector interface: what one tile location's anomaly model must provide.

A *detector* is an anomaly-detection method (PaDiM, PatchCore, STFPM, ...)
fitted once per tile location. The ensemble (:mod:`tilead.trainer.fit`,
:mod:`tilead.trainer.inference`) owns everything around it and is the same for every detector: data loading,
tiling with the runtime's tile kernel, the per-location loop, checkpoints and
resume, validation statistics, evaluation, export and the bundle. A detector
only says how to fit one location and what module to run.

Adding a detector is one new package ``tilead.trainer.detectors.<family>``
(discovered automatically, nothing else is edited): ``config.py`` with its
config section (a :class:`~tilead.trainer.detectors.sections.DetectorSection`
subclass with a ``family`` literal, decorated with
:func:`~tilead.trainer.detectors.sections.register_section`), ``detector.py``
with a :class:`Detector` subclass decorated with :func:`register`, and its
math (by convention ``model.py``).

Lifecycle of one location (what the ensemble does)::

    detector = create_detector(cfg, backbone, grid.tile_size)    # cheap, no data
    state = detector.fit(fit_tiles, holdout_tiles, progress=True) # -> LocationState
    save_state(path, detector, state, extra_metadata)              # safetensors + JSON
    ...
    state = load_state(path, detector)                             # checks format / family
    model = detector.build(state)                                  # eager nn.Module (eval, validation)
    model = detector.build(state, export=True)                     # module traced to ONNX

Contract of the tiles (:class:`TileSource`): float32 ``(n, C, th, tw)``
batches, already normalized with the backbone's mean/std by the runtime's tile
kernel (exactly the Predictor's preprocessing), ``C`` 3 (RGB; gray images are
repeated by the loader) and ``(th, tw)`` the grid's tile size. A source is
*re-iterable*: every ``iter()`` re-reads the images from disk in the same
order, so a trained detector can run several epochs. The ensemble gives
``fit`` two sources: ``fit`` (the images to learn from) and ``holdout`` (good
images held out of ``fit`` for early stopping or model selection; empty
unless :attr:`Detector.holdout_fraction` is above 0). Neither contains the
validation images that later give the normalization statistics.

Contract of the module (:class:`LocationModel`): ``forward`` maps
``(n, C, th, tw)`` float32 tiles to a float32 anomaly map ``(n, 1, h, w)``
with ``(h, w) = detector.map_size`` = ``ceil(th / s), ceil(tw / s)`` for the
detector's :attr:`Detector.output_stride` ``s`` (input pixels per map pixel).
Higher is more anomalous; any scale (validation statistics normalize it). The
runtime upsamples each map bilinearly (half-pixel centres) to the tile size,
blends the tiles, smooths seams and normalizes; the deployed image score is
the max of the final map. A detector with its own image score (PatchCore's
reweighted nearest-neighbour score) sets ``has_image_score`` on its config
section and implements :meth:`LocationModel.forward_with_score`. Eager evaluation always
reports that score's AUROC; with ``postprocess.image_score: detector`` it is
also the deployed score: :meth:`Detector.build` is asked for ``with_score``,
the exported graph gets a second output ``score`` ``(n,)``, validation
normalizes the image score (max over an image's tiles) with that score's
statistics, and the Predictor does the same.

Only ops ONNX Runtime's CPU provider supports at opset 18 may be used in
``forward`` (it is exported with ``torch.onnx.export(dynamo=True)`` with a
dynamic batch dimension), and the ONNX output must match the eager module's
within 1e-5 of the map range (the exporter checks it on every location).

State (:class:`LocationState`): named tensors (saved as safetensors, no
pickles) plus JSON-able metadata (saved as one JSON string in the safetensors
header). Everything needed to rebuild the module, together with the run
config and the backbone, must be in it. Locations of one run should have the
same tensor shapes where the method allows it: the exporter then traces the
first location once and swaps the weights of the others (``export_like``);
when shapes differ it exports each location afresh, which is only slower.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from tilead.trainer.detectors.registry import add_family, discover_families
from tilead.trainer.maps import map_size

if TYPE_CHECKING:
    from tilead.trainer.backbones import BackboneInfo, FeatureExtractor
    from tilead.trainer.config import RunConfig


@runtime_checkable
class TileSource(Protocol):
    """A re-iterable stream of one location's normalized tile batches.

    Every ``iter()`` starts again from the first image (images are re-read
    from disk, in the same order). Batches are float32 ``(n, C, th, tw)``
    CPU tensors (channels-last memory format), ``1 <= n <= batch_size``.

    Attributes:
        num_images: Images (= tiles of this location) per pass; 0 for an
            empty source, which yields nothing.
        batch_size: Largest ``n``.
        label: A short name for progress bars (e.g. ``"fit r0c1"``).
    """

    num_images: int
    batch_size: int
    label: str

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield ``(n, C, th, tw)`` float32 tile batches, one pass over the images."""
        ...

    def __len__(self) -> int:
        """Batches per pass."""
        ...


@dataclass
class LocationState:
    """A fitted location: tensors plus JSON-able metadata.

    Attributes:
        tensors: Named CPU tensors (contiguous; any dtype safetensors stores).
        meta: JSON-serializable facts (numbers, strings, lists, dicts): e.g.
            training curves, chosen epoch, bank size. Stored in the checkpoint.
        tiles: Tiles the location was fitted on (reported in ``run.json``).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    tiles: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class LocationModel(nn.Module):
    """One location's inference module: tiles in, anomaly map out.

    Subclasses implement :meth:`forward`; a detector with its own image score
    also overrides :meth:`forward_with_score` and sets ``has_image_score``.
    """

    has_image_score: ClassVar[bool] = False

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly map of a tile batch.

        Args:
            x: float32 ``(n, C, th, tw)`` normalized tiles.

        Returns:
            float32 ``(n, 1, h, w)`` at the detector's output stride.
        """

    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly map and the detector's own image score.

        The default score is the max of the tile's map.

        Args:
            x: float32 ``(n, C, th, tw)`` normalized tiles.

        Returns:
            ``(map, score)``: float32 ``(n, 1, h, w)`` and ``(n,)``.
        """
        out = self.forward(x)
        return out, out.flatten(1).amax(dim=1)


class Detector(ABC):
    """An anomaly-detection method, fitted once per tile location.

    A detector object is cheap and holds no fitted data: it is the method's
    settings bound to a backbone and a tile size. :meth:`fit` returns a
    location's :class:`LocationState`; :meth:`build` turns a state into a
    module. The same object serves every location of a run.

    Class attributes (set by every subclass):
        family: The ``model.family`` value selecting it (registry key).
        state_format: Checkpoint format tag, e.g. ``"tilead.padim.v1"``;
            bump it when the saved tensors change meaning.

    Args:
        settings: The run's ``model`` config section (the family's pydantic model).
        backbone: The shared frozen feature extractor (already built from
            ``settings.backbone``; channels-last). Detectors must not train it.
        tile_size: ``(th, tw)`` of the grid.
        seed: The run's seed (every random choice derives from it).

    Attributes:
        work_dir: A folder where :meth:`fit` may keep resumable progress of
            the location it is fitting (e.g. per-epoch checkpoints of a trained
            detector), or None. The ensemble sets it to a per-location folder
            under the run before each ``fit`` and deletes that folder once the
            location's checkpoint is saved; ``fit`` must work without it.
    """

    family: ClassVar[str]
    state_format: ClassVar[str]

    def __init__(self, settings: Any, backbone: FeatureExtractor, tile_size: tuple[int, int], seed: int) -> None:
        self.settings = settings
        self.backbone = backbone
        self.tile_size = (int(tile_size[0]), int(tile_size[1]))
        self.seed = int(seed)
        self.work_dir: Path | None = None

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def output_stride(self) -> int:
        """Input pixels per map pixel (default: ``settings.feature_stride``)."""
        return int(self.settings.feature_stride)

    @property
    def map_size(self) -> tuple[int, int]:
        """``(h, w)`` of the module's output map for one tile."""
        return map_size(self.tile_size, self.output_stride)

    @property
    def holdout_fraction(self) -> float:
        """Fraction of the fit images the ensemble holds out for :meth:`fit`'s ``holdout`` (0: none)."""
        return 0.0

    @staticmethod  # noqa: B027 - an optional hook, empty by default
    def check_backbone(info: BackboneInfo, settings: Any) -> None:
        """Reject a backbone / settings combination before anything is fitted.

        Called by the ensemble right after building the backbone.

        Args:
            info: The built backbone's layers, channels and strides.
            settings: The ``model`` config section.

        Raises:
            ValueError: Naming the config key at fault.
        """

    # -- fitting ----------------------------------------------------------------------------------

    @abstractmethod
    def fit(self, fit: TileSource, holdout: TileSource, *, progress: bool = True) -> LocationState:
        """Fit one location.

        Args:
            fit: Tiles to learn from (re-iterable; iterate it as many times as needed).
            holdout: Held-out good tiles of the same location (early stopping,
                model selection); ``holdout.num_images == 0`` when
                :attr:`holdout_fraction` is 0.
            progress: Show progress bars (tqdm, ``leave=False``) for long loops.

        Returns:
            The fitted state (CPU tensors).

        Raises:
            ValueError: If there are too few tiles for the method.
        """

    # -- inference --------------------------------------------------------------------------------

    @abstractmethod
    def build(self, state: LocationState, *, export: bool = False, with_score: bool = False) -> LocationModel:
        """The location's module from its state, in eval mode.

        Args:
            state: As returned by :meth:`fit` (or loaded from a checkpoint).
            export: Build the variant traced to ONNX (may differ from the
                eager one for speed, e.g. PaDiM's block-row form; the exporter
                checks it against the eager module numerically).
            with_score: The export variant must also support
                :meth:`LocationModel.forward_with_score` (the bundle deploys the
                detector's image score). Eager modules (``export=False``) always
                support it; an export variant without it may leave out what only
                the score needs, so that its ONNX holds the map's weights only.

        Raises:
            ValueError: If the state does not fit the settings / tile size.
        """

    # -- descriptions -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Static facts for ``run.json``'s ``model`` section (JSON-able). Extend, keep these keys."""
        return {"family": self.family, "output_stride": self.output_stride, "map_size": list(self.map_size)}

    def manifest_info(self) -> dict[str, Any]:
        """Extra JSON-able facts for the bundle manifest's ``model`` section.

        Merged into that section, so the keys must be ones the runtime's
        manifest reader accepts: put free-form facts under ``"detector"``
        (e.g. ``{"detector": {"bank_size": 4096}}``).
        """
        return {}


def iterate(source: TileSource, *, progress: bool, desc: str | None = None) -> Iterator[torch.Tensor]:
    """One pass over ``source``, with a tqdm bar (``leave=False``) when ``progress``.

    Args:
        source: The tiles.
        progress: Show the bar.
        desc: Bar label (default ``source.label``).

    Yields:
        float32 ``(n, C, th, tw)`` tile batches.
    """
    from tqdm.auto import tqdm

    with tqdm(total=len(source), desc=desc or source.label, unit="batch", leave=False, disable=not progress) as bar:
        for batch in source:
            yield batch
            bar.update(1)


# -- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Detector]] = {}
_D = TypeVar("_D", bound=type[Detector])


def register(cls: _D) -> _D:
    """Class decorator: make a detector selectable by its ``family``.

    Raises:
        ValueError: If another class already registered that family.
    """
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise ValueError(f"{cls.__name__}: a detector needs a non-empty class attribute 'family'")
    detector: type[Detector] = cls
    add_family(_REGISTRY, family, detector, "detector family")
    return cls


def _discover() -> None:
    """Import the ``detector`` module of every family package (each registers its detector)."""
    discover_families("detector")


def families() -> list[str]:
    """Registered detector families, sorted."""
    _discover()
    return sorted(_REGISTRY)


def detector_class(family: str) -> type[Detector]:
    """The detector registered for ``family``.

    Raises:
        ValueError: For an unknown family, listing the known ones.
    """
    if family not in _REGISTRY:
        _discover()
    if family not in _REGISTRY:
        raise ValueError(f"model.family: unknown detector {family!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[family]


def create_detector(cfg: RunConfig, backbone: FeatureExtractor, tile_size: tuple[int, int]) -> Detector:
    """The run's detector (``cfg.model.family``) bound to ``backbone`` and ``tile_size``."""
    cls = detector_class(cfg.model.family)
    return cls(cfg.model, backbone, tile_size, cfg.seed)


# -- checkpoints ----------------------------------------------------------------------------------

META_KEY = "detector_meta"


def save_state(path: Path, detector: Detector, state: LocationState, metadata: dict[str, str]) -> None:
    """Write a location checkpoint: safetensors tensors, string metadata, the state's meta as JSON.

    Args:
        path: Target ``.safetensors`` file (written atomically).
        detector: The detector that fitted ``state``.
        state: The fitted state.
        metadata: The ensemble's string metadata (location, fit key, ...).
    """
    from tilead.trainer.io import save_tensors

    meta = {
        **metadata,
        "format": detector.state_format,
        "family": detector.family,
        META_KEY: json.dumps(state.meta, sort_keys=True),
    }
    save_tensors(path, state.tensors, meta)


def load_state(path: Path, detector: Detector) -> tuple[LocationState, dict[str, str]]:
    """Read a location checkpoint written by :func:`save_state`.

    Returns:
        ``(state, metadata)``: the state and the checkpoint's string metadata.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is unreadable or was written by another detector / format.
    """
    from tilead.trainer.io import load_tensors

    tensors, meta = load_tensors(path)
    fmt = meta.get("format")
    if fmt != detector.state_format:
        raise ValueError(
            f"checkpoint {path}: format {fmt!r}, but model.family {detector.family!r} reads {detector.state_format!r}"
        )
    try:
        extra = json.loads(meta.get(META_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {path}: unreadable {META_KEY} ({err})") from None
    return LocationState(tensors, extra, int(meta.get("images", "0") or 0)), meta
