"""Dataset discovery and image loading for the trainer.

Two layouts are supported. Only the files directly inside each folder are used
(no recursion); hidden files (names starting with ``.``) are ignored; the file
extension is matched case-insensitively against ``extensions``.

MVTec AD (``format: mvtec``; the category folder is ``root``, or
``root/category`` when ``category`` is set)::

    train/good/*                        defect-free training images
    test/good/*                         defect-free test images (no masks; optional)
    test/<type>/*                       defective test images, one folder per defect type
    ground_truth/<type>/<stem>_mask.png the mask of test/<type>/<stem>.<ext>

Folder (``format: folder``; every folder is relative to ``root``)::

    <good_dir>/*                        defect-free training images
    <test_good_dir>/*                   defect-free test images (optional)
    <defect_dir>/*                      defective test images; the folder's name is the defect type
    <mask_dir>/<defect_dir>/<stem><mask_suffix>.png   the mask of <defect_dir>/<stem>.<ext>
                                        (or wherever mask_template puts it)

Good images only (both layouts): the test set is optional. An MVTec folder
with ``train/good`` and no ``test`` folder, or a folder config with
``defect_dirs: []`` (and no ``test_good_dir``), gives an empty test set;
training then validates on held-out good images (``validation.split``
``holdout`` or ``synthetic``) and ``tilead-eval`` reports the false-alarm
rate on good images. A test folder without images is ignored with a warning.

Mask naming rule (both layouts): the mask of the defective image
``<defect folder>/<stem>.<ext>`` is ``<mask folder>/<defect folder>/<stem><mask_suffix>.png``
(MVTec: mask folder ``ground_truth``, suffix ``_mask``). The folder layout can
name masks any other way with ``mask_template`` (placeholders ``{root}``,
``{defect_dir}``, ``{defect}``, ``{stem}``, ``{name}``, ``{ext}``; see
:mod:`tilead.trainer.mask_paths`), e.g. ``"{root}/ground_truth/{defect}/{stem}_mask.png"``;
it replaces ``mask_dir`` and ``mask_suffix``. A defective image
without its mask file is an error naming the image and the expected mask path,
unless ``missing_masks: empty`` (then it has no ground-truth pixels and a
warning is logged).

Images and masks are decoded by :mod:`tilead.trainer.images`.

Order is deterministic: training images sorted by file name; test images
``good`` first, then the defect types in alphabetical order, each sorted by
file name. ``max_*_images`` keep an evenly spaced selection of that order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from tilead.trainer.mask_paths import MaskTemplate

__all__ = [
    "DEFAULT_EXTENSIONS",
    "MASK_THRESHOLD",
    "DataConfig",
    "DatasetError",
    "DatasetSplits",
    "Sample",
    "UnreadableFileError",
    "discover",
]

logger = logging.getLogger("tilead.trainer.data")

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_THRESHOLD = 127
"""An 8-bit mask pixel is anomalous when its value is greater than this."""

_MVTEC_LAYOUT = "train/good, test/<type>, ground_truth/<type>/<stem>_mask.png"
# Folder-layout keys and their defaults: with format 'mvtec' they must keep them.
_FOLDER_ONLY: dict[str, Any] = {
    "good_dir": "good",
    "test_good_dir": None,
    "defect_dirs": [],
    "mask_dir": None,
    "mask_suffix": "_mask",
    "mask_template": None,
}
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset problem: missing folders or files, mismatched sizes, unreadable files."""


class UnreadableFileError(DatasetError):
    """An image or mask file that cannot be decoded (``skip_bad_files`` may skip these).

    Attributes:
        path: The unreadable file.
        reason: Why it could not be read.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path
        self.reason = reason


# -- configuration ------------------------------------------------------------------------------------


class DataConfig(BaseModel):
    """Where the dataset is and how its images are loaded.

    Attributes:
        format: ``"mvtec"`` or ``"folder"`` (see the module docstring for both layouts).
        root: Dataset root; relative paths are resolved by :meth:`resolved`.
        category: MVTec only: subfolder of ``root`` holding the category (``None``: ``root`` is it).
        good_dir: Folder only: defect-free training images, relative to ``root``.
        test_good_dir: Folder only: defect-free test images (optional).
        defect_dirs: Folder only: folders of defective test images; a folder's name is its defect type.
        mask_dir: Folder only: mask folder, laid out as ``<mask_dir>/<defect_dir>/<stem><mask_suffix>.png``.
        mask_suffix: Folder only: appended to the image stem to name its mask.
        mask_template: Folder only: the mask path of a defective image as a template, e.g.
            ``"{root}/ground_truth/{defect}/{stem}_mask.png"`` (placeholders: see
            :mod:`tilead.trainer.mask_paths`; relative to ``root``); replaces ``mask_dir`` and ``mask_suffix``.
        missing_masks: ``"error"`` (default) or ``"empty"``: a defective image without a mask then has no
            ground-truth pixels (a warning is logged).
        image_size: ``(height, width)`` or one int every image and mask is resized to; ``None``: native
            size, which all images must share.
        color: ``"rgb"`` (3 channels; gray files are expanded) or ``"gray"`` (1 channel).
        channel_order: ``"BGR"`` or ``"RGB"``: the order of the 3-channel arrays returned.
        extensions: Image file extensions, matched case-insensitively.
        skip_bad_files: Skip unreadable image or mask files (listed in :attr:`ImageLoader.skipped`)
            instead of stopping with an error.
        max_train_images: Keep at most this many training images (evenly spaced in sorted order).
        max_test_images: Keep at most this many test images (evenly spaced in sorted order).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["mvtec", "folder"]
    root: Path
    category: str | None = None
    good_dir: str = "good"
    test_good_dir: str | None = None
    defect_dirs: list[str] = Field(default_factory=list)
    mask_dir: str | None = None
    mask_suffix: str = "_mask"
    mask_template: str | None = None
    missing_masks: Literal["error", "empty"] = "error"
    image_size: tuple[int, int] | int | None = None
    color: Literal["rgb", "gray"] = "rgb"
    channel_order: Literal["BGR", "RGB"] = "BGR"
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    skip_bad_files: bool = False
    max_train_images: PositiveInt | None = None
    max_test_images: PositiveInt | None = None

    @field_validator("image_size", mode="before")
    @classmethod
    def _check_image_size(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if min(value) < 1:
                raise ValueError(f"expected a positive height and width, got {list(value)}")
            return tuple(value)
        raise ValueError(f"expected a positive integer or [height, width] of positive integers, got {value!r}")

    @field_validator("extensions")
    @classmethod
    def _check_extensions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"expected at least one file extension, e.g. {list(DEFAULT_EXTENSIONS)}")
        out: list[str] = []
        for ext in value:
            ext = ext.strip().lower()
            if ext in ("", "."):
                raise ValueError(f"expected extensions such as '.png', got {value!r}")
            ext = ext if ext.startswith(".") else "." + ext
            if ext not in out:
                out.append(ext)
        return out

    @field_validator("mask_template")
    @classmethod
    def _check_mask_template(cls, value: str | None) -> str | None:
        if value is not None:
            MaskTemplate.parse(value)
        return value

    @field_validator("category", "good_dir", "test_good_dir", "mask_dir")
    @classmethod
    def _check_folder_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a folder name, got an empty string")
        return value

    @model_validator(mode="after")
    def _check_layout(self) -> DataConfig:
        if self.format == "mvtec":
            for key, default in _FOLDER_ONLY.items():
                if getattr(self, key) != default:
                    raise ValueError(
                        f"{key}: only used with format 'folder' (the MVTec layout is fixed: {_MVTEC_LAYOUT}); "
                        "remove it or use format: folder"
                    )
            return self
        if self.category is not None:
            raise ValueError("category: only used with format 'mvtec'; with format 'folder' put it into root")
        if self.mask_template is not None and (self.mask_dir is not None or self.mask_suffix != "_mask"):
            raise ValueError(
                "mask_template: replaces mask_dir and mask_suffix (masks are <mask_dir>/<defect_dir>/<stem>"
                "<mask_suffix>.png without it); give either mask_template or mask_dir/mask_suffix"
            )
        if self.defect_dirs and self.mask_dir is None and self.mask_template is None and self.missing_masks == "error":
            raise ValueError(
                "mask_dir: required with format 'folder' (masks are <mask_dir>/<defect_dir>/<stem><mask_suffix>.png) "
                "unless mask_template names them another way, or missing_masks is 'empty' "
                "(defective images without ground-truth pixels)"
            )
        types: dict[str, str] = {}
        for folder in self.defect_dirs:
            name = Path(folder).name
            if not folder.strip() or name in ("", ".", ".."):
                raise ValueError(f"defect_dirs: expected folder names, got {folder!r}")
            if name == "good":
                raise ValueError(f"defect_dirs: {folder!r} would have the defect type 'good', reserved for good images")
            if name in types:
                raise ValueError(f"defect_dirs: {types[name]!r} and {folder!r} both have the defect type {name!r}")
            types[name] = folder
        defect_paths = {Path(d) for d in self.defect_dirs}
        for key in ("good_dir", "test_good_dir"):
            value = getattr(self, key)
            if value is not None and Path(value) in defect_paths:
                raise ValueError(f"{key}: {value!r} is also listed in defect_dirs")
        if self.test_good_dir is not None and Path(self.test_good_dir) == Path(self.good_dir):
            raise ValueError(
                f"test_good_dir: {self.test_good_dir!r} is the training folder good_dir; "
                "test images must not be training images"
            )
        return self

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` every image is resized to, or ``None`` for native size."""
        size = self.image_size
        if size is None:
            return None
        if isinstance(size, int):
            return (size, size)
        return (int(size[0]), int(size[1]))

    @property
    def dataset_root(self) -> Path:
        """The folder the layout starts at: ``root/category`` or ``root``."""
        return self.root / self.category if self.category is not None else self.root

    def resolved(self, base_dir: Path) -> DataConfig:
        """This config with ``root`` made absolute (``~`` expanded, relative paths joined to ``base_dir``).

        Args:
            base_dir: Directory a relative ``root`` is relative to (usually the config file's folder).

        Returns:
            A new config; ``self`` is unchanged.
        """
        root = self.root.expanduser()
        if not root.is_absolute():
            root = Path(base_dir).expanduser() / root
        return self.model_copy(update={"root": root})


# -- discovery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of the dataset.

    Attributes:
        path: The image file.
        label: 0 for good, 1 for anomalous.
        defect_type: ``"good"`` or the defect type (the defect folder's name).
        mask_path: The ground-truth mask file; ``None`` for good images and for defective images
            without a mask (``missing_masks: empty``), whose masks are all False.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


@dataclass(frozen=True)
class DatasetSplits:
    """The dataset's samples in deterministic order.

    Attributes:
        train: Defect-free training images, sorted by file name.
        test: Good test images first, then the defect types alphabetically, each sorted by file name;
            empty for a dataset of good images only.
    """

    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    @property
    def defect_types(self) -> tuple[str, ...]:
        """The defect types present in ``test``, in order (without ``"good"``)."""
        return tuple(dict.fromkeys(s.defect_type for s in self.test if s.label == 1))


def _list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = set(extensions)
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in exts and p.is_file()]
    return sorted(files, key=lambda p: p.name)


def _evenly_spaced(items: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` items, evenly spaced over ``items`` (first item included)."""
    n = len(items)
    if limit is None or limit >= n:
        return items
    return [items[(i * n) // limit] for i in range(limit)]


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{what} not found: {folder}")


def _exts(config: DataConfig) -> str:
    return ", ".join(config.extensions)


def discover(config: DataConfig) -> DatasetSplits:
    """Find the training and test samples of a dataset.

    Args:
        config: The data config (``root`` should already be absolute, see :meth:`DataConfig.resolved`;
            a relative one is taken relative to the working directory).

    Returns:
        The splits, in the deterministic order described in the module docstring, cut to
        ``max_train_images`` / ``max_test_images``.

    Raises:
        DatasetError: If the root or a configured folder is missing, no training images are found, or
            (``missing_masks: error``) a defective image has no mask file.
    """
    root = config.dataset_root
    if not root.is_dir():
        where = f" (root {config.root}, category {config.category!r})" if config.category is not None else ""
        raise DatasetError(f"dataset root not found: {root}{where}")

    groups: list[tuple[str, Path, Callable[[Path], Path] | None]] = []  # (defect type, folder, image -> mask)
    if config.format == "mvtec":
        train_dir = root / "train" / "good"
        _require_dir(train_dir, f"training folder (MVTec layout: {_MVTEC_LAYOUT})")
        test_dir = root / "test"
        types = (
            sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if test_dir.is_dir()
            else []  # good images only: no test set
        )
        for name in sorted(types, key=lambda t: (t != "good", t)):
            masks = None if name == "good" else _in_folder(root / "ground_truth" / name, "_mask")
            groups.append((name, test_dir / name, masks))
    else:
        train_dir = root / config.good_dir
        _require_dir(train_dir, "training folder (good_dir)")
        if config.test_good_dir is not None:
            folder = root / config.test_good_dir
            _require_dir(folder, "test folder of good images (test_good_dir)")
            groups.append(("good", folder, None))
        defects = sorted(config.defect_dirs, key=lambda d: Path(d).name)
        template = MaskTemplate.parse(config.mask_template) if config.mask_template is not None else None
        for defect_dir in defects:
            folder = root / defect_dir
            _require_dir(folder, "defect folder (defect_dirs)")
            masks = None
            if template is not None:
                masks = _by_template(template, root, defect_dir)
            elif config.mask_dir is not None:
                masks = _in_folder(root / config.mask_dir / defect_dir, config.mask_suffix)
            groups.append((Path(defect_dir).name, folder, masks))

    train_files = _list_images(train_dir, config.extensions)
    if not train_files:
        raise DatasetError(f"no training images found in {train_dir} (looked for extensions {_exts(config)})")
    train = [Sample(p, 0, "good", None) for p in train_files]

    test: list[Sample] = []
    missing: list[tuple[Path, Path | None]] = []
    mask_owner: dict[Path, Path] = {}
    for defect_type, folder, mask_of in groups:
        files = _list_images(folder, config.extensions)
        if not files:
            logger.warning("no images in %s (looked for extensions %s); ignored", folder, _exts(config))
        for path in files:
            if defect_type == "good":
                test.append(Sample(path, 0, "good", None))
                continue
            mask: Path | None = None
            if mask_of is not None:
                mask = mask_of(path)
                if mask in mask_owner:
                    raise DatasetError(
                        f"{mask_owner[mask]} and {path} would share the mask {mask}; make mask_template tell them "
                        "apart (e.g. with {defect} or {name})"
                    )
                mask_owner[mask] = path
                if not mask.is_file():
                    missing.append((path, mask))
                    mask = None
            else:
                missing.append((path, None))
            test.append(Sample(path, 1, defect_type, mask))
    if not test and groups:
        logger.warning("no test images: the dataset has good training images only")
    if missing:
        _report_missing_masks(missing, config)

    return DatasetSplits(
        train=tuple(_evenly_spaced(train, config.max_train_images)),
        test=tuple(_evenly_spaced(test, config.max_test_images)),
    )


def _in_folder(folder: Path, suffix: str) -> Callable[[Path], Path]:
    """``<folder>/<stem><suffix>.png`` for an image: the fixed layout's rule."""
    return lambda image: folder / f"{image.stem}{suffix}.png"


def _by_template(template: MaskTemplate, root: Path, defect_dir: str) -> Callable[[Path], Path]:
    return lambda image: template.path(root, defect_dir, image)


def _report_missing_masks(missing: list[tuple[Path, Path | None]], config: DataConfig) -> None:
    lines = [
        f"  {image} -> expected mask {mask}" if mask is not None else f"  {image} (no mask_dir configured)"
        for image, mask in missing[:_MAX_LISTED]
    ]
    if len(missing) > _MAX_LISTED:
        lines.append(f"  ... and {len(missing) - _MAX_LISTED} more")
    listing = "\n".join(lines)
    rule = (
        f"mask_template {config.mask_template!r}"
        if config.mask_template is not None
        else "<mask folder>/<defect folder>/<stem><mask_suffix>.png"
    )
    if config.missing_masks == "error":
        raise DatasetError(
            f"{len(missing)} defective image(s) have no mask file (rule: {rule}):\n{listing}\n"
            "set missing_masks: empty to treat them as having no ground-truth pixels"
        )
    logger.warning(
        "%d defective image(s) have no mask file; their masks are empty (missing_masks: empty):\n%s",
        len(missing),
        listing,
    )
