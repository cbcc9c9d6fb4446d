"""Decoding images and masks, and loading them in batches, for the trainer.

Pixel conventions of :class:`ImageLoader`:

* images come back as uint8 ``(H, W, 3)`` in ``channel_order`` (``color: rgb``)
  or ``(H, W, 1)`` (``color: gray``), C-contiguous;
* 16-bit images are reduced to 8 bits by ``>> 8`` (the high byte); 4-channel
  (BGRA) images lose their alpha; gray+alpha keeps the gray channel;
* EXIF orientation is ignored (files are decoded as stored);
* colour files in a gray run become gray with :func:`tilead.imagefile.bgr_to_gray` (the one
  definition the runtime's commands use too; within one level of OpenCV's ``COLOR_BGR2GRAY``);
* a mask pixel is anomalous when its 8-bit value is ``> 127`` (16-bit masks are
  reduced by ``>> 8`` first; colour masks use the brightest of B, G, R), except
  that masks whose maximum is exactly 1 (0/1 label masks) use ``> 0``;
* with ``image_size`` set, images are resized with the runtime's
  :func:`~tilead.runtime.image_resize.resize_image` (OpenCV's ``INTER_AREA``, bit
  for bit, when shrinking in both directions, else bilinear), the same function
  ``Predictor(resize=True)`` uses (``docs/resizing.md``); masks with
  ``cv2.INTER_NEAREST`` after the mask's size has been checked against its
  image's native size.

Files whose pixels cannot be decoded raise :class:`~tilead.trainer.data.UnreadableFileError`
naming the file (``skip_bad_files`` skips and lists them instead).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tilead.imagefile import bgr_to_gray
from tilead.runtime.image_resize import resize_image
from tilead.trainer.data import MASK_THRESHOLD, DataConfig, DatasetError, Sample, UnreadableFileError

__all__ = ["Batch", "ImageLoader"]

logger = logging.getLogger("tilead.trainer.data")


# -- decoding -----------------------------------------------------------------------------------------


def _decode(path: Path) -> np.ndarray:
    """The file as OpenCV decodes it (``IMREAD_UNCHANGED``), via ``imdecode`` so any path works."""
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise UnreadableFileError(path, err.strerror or str(err)) from err
    if buffer.size == 0:
        raise UnreadableFileError(path, "the file is empty")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise UnreadableFileError(path, f"OpenCV failed to decode it ({str(err).strip().splitlines()[-1]})") from err
    if image is None or image.size == 0:
        raise UnreadableFileError(path, "not a decodable image (corrupt, truncated or an unsupported format)")
    out: np.ndarray = image
    return out


def _to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        out: np.ndarray = (image >> 8).astype(np.uint8)
        return out
    raise UnreadableFileError(path, f"unsupported pixel type {image.dtype} (expected 8- or 16-bit unsigned integers)")


def _gray_or_bgr(image: np.ndarray, path: Path) -> np.ndarray:
    """Gray ``(H, W)`` or BGR ``(H, W, 3)`` from a decoded uint8 image (alpha dropped)."""
    if image.ndim == 3 and image.shape[2] in (1, 2):  # gray, gray + alpha
        image = image[:, :, 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        out: np.ndarray = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        return out
    raise UnreadableFileError(path, f"unsupported image layout {image.shape} (expected 1, 2, 3 or 4 channels)")


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize with the runtime's image resize, so that ``Predictor(resize=True)`` sees the pixels training saw.

    ``(H, W)`` or ``(H, W, C)`` uint8 in, the same layout out (:func:`tilead.runtime.image_resize.resize_image`).
    """
    out = resize_image(image if image.ndim == 3 else image[:, :, None], size)
    return out if image.ndim == 3 else out[:, :, 0]


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from the file header (Pillow reads only the header); ``None`` if it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return (int(height), int(width)) if width > 0 and height > 0 else None


# -- loading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Loaded samples.

    Attributes:
        images: ``(n, H, W, C)`` uint8, C-contiguous; ``C`` is 3 (in ``channel_order``) or 1 (gray).
        masks: ``(n, H, W)`` bool ground truth (True = anomalous), or ``None`` when not requested.
        samples: The ``n`` samples, in order.
    """

    images: np.ndarray
    masks: np.ndarray | None
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 image labels (0 good, 1 anomalous)."""
        return np.array([s.label for s in self.samples], dtype=np.int64)


@dataclass(frozen=True)
class _Loaded:
    image: np.ndarray
    mask: np.ndarray | None
    native: tuple[int, int]


@dataclass(frozen=True)
class _Failed:
    reason: str


class ImageLoader:
    """Loads images and masks as configured.

    Without ``image_size`` all images must share one native size: the first image loaded or probed sets
    it, and any other size is an error naming both files and sizes. Loading is thread-safe.

    Attributes:
        config: The data config.
        skipped: ``(sample image path, message naming the bad file)`` for every sample skipped because
            of an unreadable image or mask (only with ``skip_bad_files``; each sample listed once).
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.skipped: list[tuple[Path, str]] = []
        self._skipped_paths: set[Path] = set()
        self._reference: tuple[Path, tuple[int, int]] | None = None
        self._lock = threading.Lock()

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` every image is resized to, or ``None`` for native size."""
        return self.config.output_size

    @property
    def channels(self) -> int:
        """Channels of the returned images: 3 (``rgb``) or 1 (``gray``)."""
        return 1 if self.config.color == "gray" else 3

    # -- single files

    def load_image(self, source: Sample | Path | str) -> np.ndarray:
        """Load one image.

        Args:
            source: A sample or an image path.

        Returns:
            uint8 ``(H, W, C)``, C-contiguous, ``C`` = 3 in ``channel_order`` or 1 (gray), at
            ``image_size`` or native size.

        Raises:
            UnreadableFileError: If the file cannot be read or decoded (even with ``skip_bad_files``).
            DatasetError: If (native size) its size differs from the dataset's.
        """
        path = source.path if isinstance(source, Sample) else Path(source)
        image, native = self._load_image(path)
        self._check_native(path, native)
        return image

    def load_mask(self, sample: Sample, image_shape: Sequence[int] | None = None) -> np.ndarray:
        """Load a sample's ground-truth mask.

        Args:
            sample: The sample.
            image_shape: Native ``(H, W[, C])`` of the sample's image as stored on disk (not resized);
                read from the image file's header when ``None``.

        Returns:
            bool ``(H, W)`` at ``image_size`` (or native size), True = anomalous (8-bit value > 127);
            all False for good samples and defective samples without a mask.

        Raises:
            UnreadableFileError: If the mask file cannot be read.
            DatasetError: If the mask's size differs from its image's native size.
        """
        native = (int(image_shape[0]), int(image_shape[1])) if image_shape is not None else None
        if sample.mask_path is None and self.output_size is not None:
            return np.zeros(self.output_size, dtype=bool)
        if native is None:
            native = self._native_size(sample.path)
        return self._load_mask(sample, native)

    def load_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Load a sample's image and mask, reading the image once.

        Returns:
            ``(image (H, W, C) uint8, mask (H, W) bool)`` as :meth:`load_image` and :meth:`load_mask`.

        Raises:
            DatasetError: As :meth:`load_image` and :meth:`load_mask`.
        """
        image, native = self._load_image(sample.path)
        self._check_native(sample.path, native)
        return image, self._load_mask(sample, native)

    def probe_size(self, samples: Iterable[Sample]) -> tuple[int, int]:
        """The ``(height, width)`` of the loaded images.

        ``image_size`` when configured (nothing is read). Otherwise every sample's size is read (from the
        file header with Pillow; decoded with OpenCV where Pillow cannot parse it) and must be the same; the
        result becomes the reference for later loads.

        Raises:
            DatasetError: On a size mismatch (naming the file and both sizes), an unreadable file
                (unless ``skip_bad_files``), or when no sample is readable.
        """
        if self.output_size is not None:
            return self.output_size
        size: tuple[int, int] | None = None
        count = 0
        for sample in samples:
            count += 1
            if sample.path in self._skipped_paths:
                continue
            try:
                native = self._native_size(sample.path)
            except UnreadableFileError as err:
                if not self.config.skip_bad_files:
                    raise
                self._skip(sample.path, str(err))
                continue
            self._check_native(sample.path, native)
            size = native
        if size is None:
            raise DatasetError(f"probe_size: no readable image among {count} sample(s)")
        return size

    # -- batches

    def iter_batches(
        self,
        samples: Iterable[Sample],
        batch_size: int,
        *,
        with_masks: bool = False,
        progress: str | None = None,
    ) -> Iterator[Batch]:
        """Load samples in order, in batches, with the next batch loading in the background.

        Two worker threads decode the images; only the batch being built, the one last yielded and the
        prefetched next batch's images are alive at a time. With ``skip_bad_files`` unreadable samples are
        left out (so a batch can be shorter than ``batch_size``, and a batch with nothing readable is not
        yielded) and recorded in :attr:`skipped` with a warning.

        Args:
            samples: The samples, e.g. ``DatasetSplits.train``.
            batch_size: Samples per batch (the last batch may be shorter).
            with_masks: Also load the ground-truth masks.
            progress: Description of a tqdm progress bar (on stderr); ``None``: no bar.

        Yields:
            Batches with ``images`` ``(n, H, W, C)`` uint8 and ``masks`` ``(n, H, W)`` bool or ``None``.

        Raises:
            ValueError: If ``batch_size`` is not a positive integer (raised at the call).
            DatasetError: As :meth:`load_sample` (raised while iterating).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        items = tuple(samples)
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        return self._batches(chunks, len(items), with_masks, progress)

    def _batches(
        self, chunks: list[tuple[Sample, ...]], total: int, with_masks: bool, progress: str | None
    ) -> Iterator[Batch]:
        bar = tqdm(total=total, desc=progress, disable=progress is None, unit="img")
        executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tilead-data")
        try:
            pending = self._submit(executor, chunks[0], with_masks) if chunks else deque()
            for k, chunk in enumerate(chunks):
                current = pending
                pending = self._submit(executor, chunks[k + 1], with_masks) if k + 1 < len(chunks) else deque()
                batch = self._collect(current, with_masks)
                bar.update(len(chunk))
                if batch is not None:
                    yield batch
                del batch
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _submit(
        self, executor: ThreadPoolExecutor, chunk: tuple[Sample, ...], with_masks: bool
    ) -> deque[tuple[Sample, Future[_Loaded | _Failed]]]:
        return deque(
            (s, executor.submit(self._load_one, s, with_masks)) for s in chunk if s.path not in self._skipped_paths
        )

    def _collect(self, pending: deque[tuple[Sample, Future[_Loaded | _Failed]]], with_masks: bool) -> Batch | None:
        n = len(pending)
        images: np.ndarray | None = None
        masks: np.ndarray | None = None
        kept: list[Sample] = []
        while pending:
            sample, future = pending.popleft()
            result = future.result()
            del future
            if isinstance(result, _Failed):
                self._skip(sample.path, result.reason)
                continue
            self._check_native(sample.path, result.native)
            if images is None:
                images = np.empty((n, *result.image.shape), dtype=np.uint8)
                masks = np.empty((n, *result.image.shape[:2]), dtype=bool) if with_masks else None
            images[len(kept)] = result.image
            if masks is not None and result.mask is not None:
                masks[len(kept)] = result.mask
            kept.append(sample)
            del result
        if images is None:
            return None
        m = len(kept)
        return Batch(
            images=images[:m] if m < n else images,
            masks=None if masks is None else (masks[:m] if m < n else masks),
            samples=tuple(kept),
        )

    def _load_one(self, sample: Sample, with_masks: bool) -> _Loaded | _Failed:
        try:
            image, native = self._load_image(sample.path)
            mask = self._load_mask(sample, native) if with_masks else None
        except UnreadableFileError as err:
            if not self.config.skip_bad_files:
                raise
            return _Failed(str(err))
        return _Loaded(image, mask, native)

    # -- internals

    def _skip(self, path: Path, reason: str) -> None:
        with self._lock:
            if path in self._skipped_paths:
                return
            self._skipped_paths.add(path)
            self.skipped.append((path, reason))
        logger.warning("skipping %s: %s", path, reason)

    def _check_native(self, path: Path, native: tuple[int, int]) -> None:
        if self.output_size is not None:
            return
        with self._lock:
            if self._reference is None:
                self._reference = (path, native)
                return
            ref_path, ref = self._reference
        if native != ref:
            raise DatasetError(
                f"{path}: image size {native[0]}x{native[1]} (height x width) differs from {ref[0]}x{ref[1]} of "
                f"{ref_path}; without image_size all images must share one size (set data.image_size to resize)"
            )

    def _native_size(self, path: Path) -> tuple[int, int]:
        size = _header_size(path)
        if size is not None:
            return size
        image = _decode(path)
        return (int(image.shape[0]), int(image.shape[1]))

    def _load_image(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """``(image at output size, native (height, width))``."""
        image = _gray_or_bgr(_to_uint8(_decode(path), path), path)
        if self.config.color == "gray":
            image = (image if image.ndim == 2 else bgr_to_gray(image))[:, :, None]  # the runtime CLIs' gray too
        else:
            if image.ndim == 2:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            if self.config.channel_order == "RGB":
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        native = (int(image.shape[0]), int(image.shape[1]))
        target = self.output_size
        if target is not None and target != native:
            image = _resize(image, target)
        return np.ascontiguousarray(image, dtype=np.uint8), native

    def _load_mask(self, sample: Sample, native: tuple[int, int]) -> np.ndarray:
        target = self.output_size if self.output_size is not None else native
        if sample.mask_path is None:
            return np.zeros(target, dtype=bool)
        raw = _to_uint8(_decode(sample.mask_path), sample.mask_path)
        if raw.ndim == 3:
            raw = raw[:, :, :3].max(axis=2) if raw.shape[2] >= 3 else raw[:, :, 0]
        size = (int(raw.shape[0]), int(raw.shape[1]))
        if size != native:
            raise DatasetError(
                f"mask {sample.mask_path} is {size[0]}x{size[1]} (height x width) but its image {sample.path} "
                f"is {native[0]}x{native[1]}"
            )
        threshold = 0 if int(raw.max()) == 1 else MASK_THRESHOLD
        binary = raw > threshold
        if target != native:
            resized = cv2.resize(binary.astype(np.uint8), (target[1], target[0]), interpolation=cv2.INTER_NEAREST)
            binary = resized > 0
        return np.ascontiguousarray(binary)
