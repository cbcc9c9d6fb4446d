"""TensorRT engine sets in a bundle: the manifest's ``engines`` section, cache keys and selection.

An engine set is one TensorRT engine per model (per location for
``one_to_one``; one per shared model otherwise, named after it) plus, for a
bundle with a thumbnail branch, one for ``thumbnail.onnx``, built on one kind
of GPU by one TensorRT version from the bundle's ONNX files, stored under
``engines/<key>/``. The key names everything an engine depends on, so a bundle
can carry sets for several targets side by side::

    <gpu>-sm<major><minor>-trt<major>.<minor>.<patch>-<precision>-b<max batch>-<onnx digest>

``gpu`` is the device name in lower case with non-alphanumerics as ``-``;
the ONNX digest is the first 12 hex digits of the sha256 over the models'
ONNX sha256s (then the thumbnail model's), so re-exporting the models changes
every key. Engines are built
version-compatible with the lean runtime excluded from the plan
(``EXCLUDE_LEAN_RUNTIME``): such a plan runs only with the lean runtime of the
TensorRT version that built it (``Runtime.load_runtime``'s documentation), so a
set is selected only for the same major.minor.patch runtime
(:func:`select_engine_set`); a newer runtime needs engines built by it.

Nothing here imports TensorRT or torch.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tilead.runtime._checks import as_int, check_mapping, describe
from tilead.runtime.files import LocationFile, parse_location_file

PRECISIONS = ("fp32", "fp16")
TIMING_CACHE = "timing.cache"
MAX_BATCH = 1 << 16
_KEY = re.compile(r"[a-z0-9][a-z0-9.-]{0,199}")
_SET_KEYS = (
    "key",
    "gpu",
    "compute_capability",
    "tensorrt",
    "precision",
    "batch",
    "workspace_mib",
    "version_compatible",
    "timing_cache",
    "files",
    "thumbnail",
)


EngineFile = LocationFile
"""One model's engine (name, bundle-relative file, sha256, bytes)."""
THUMBNAIL_ENGINE = "thumbnail"
"""The thumbnail model's engine name (``engines/<key>/thumbnail.engine``)."""


@dataclass(frozen=True)
class EngineSet:
    """Every model's engine for one GPU, TensorRT version, precision and batch profile.

    Attributes:
        key: Folder name under ``engines/`` (see the module docstring).
        gpu: Device name the set was built on.
        compute_capability: ``"major.minor"``.
        tensorrt: TensorRT version that built it.
        precision: ``fp32`` or ``fp16``.
        batch: ``(min, opt, max)`` of the optimization profile.
        workspace_mib: Builder workspace limit.
        version_compatible: Built with ``VERSION_COMPATIBLE`` (lean runtime excluded).
        timing_cache: Bundle-relative path of the shared timing cache, or None.
        files: One engine per model, in the manifest's model order (for ``one_to_one``: per location, row-major).
        thumbnail: The thumbnail model's engine (bundles with a thumbnail branch), else None.
    """

    key: str
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    batch: tuple[int, int, int]
    workspace_mib: int
    version_compatible: bool
    timing_cache: str | None
    files: tuple[EngineFile, ...]
    thumbnail: EngineFile | None = None

    def to_dict(self) -> dict[str, Any]:
        """Manifest form (``thumbnail`` only when there is one: older readers never see the key)."""
        out: dict[str, Any] = {
            "key": self.key,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "tensorrt": self.tensorrt,
            "precision": self.precision,
            "batch": {"min": self.batch[0], "opt": self.batch[1], "max": self.batch[2]},
            "workspace_mib": self.workspace_mib,
            "version_compatible": self.version_compatible,
            "timing_cache": self.timing_cache,
            "files": [f.to_dict() for f in self.files],
        }
        if self.thumbnail is not None:
            out["thumbnail"] = self.thumbnail.to_dict()
        return out

    @property
    def all_files(self) -> tuple[EngineFile, ...]:
        """Every engine file of the set: the models', then the thumbnail's."""
        return self.files if self.thumbnail is None else (*self.files, self.thumbnail)


def engine_sources(models: Sequence[LocationFile], thumbnail: LocationFile | None) -> tuple[LocationFile, ...]:
    """The ONNX files a set's engines are built from, in the set's order, each named as its engine.

    Args:
        models: The bundle's model files (``Manifest.models``).
        thumbnail: ``thumbnail.onnx``'s entry for a bundle with a thumbnail branch, else None.

    Returns:
        Every model's file, then the thumbnail's renamed :data:`THUMBNAIL_ENGINE` (its sha256s give the key).
    """
    if thumbnail is None:
        return tuple(models)
    return (*models, LocationFile(THUMBNAIL_ENGINE, thumbnail.file, thumbnail.sha256, thumbnail.bytes))


def slug(text: str) -> str:
    """Lower case, runs of non-alphanumerics as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def onnx_digest(onnx_sha256s: Sequence[str]) -> str:
    """First 12 hex digits of the sha256 over the models' ONNX digests, in order."""
    return hashlib.sha256("".join(onnx_sha256s).encode()).hexdigest()[:12]


def engine_key(
    gpu: str, compute_capability: str, tensorrt: str, precision: str, max_batch: int, onnx_sha256s: Sequence[str]
) -> str:
    """The ``engines/`` folder name of a set (see the module docstring).

    Raises:
        ValueError: For an unknown precision or a malformed capability or version.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {describe(precision)}")
    if not re.fullmatch(r"\d+\.\d+", compute_capability):
        raise ValueError(f"compute_capability: expected 'major.minor', got {describe(compute_capability)}")
    version = ".".join(_version(tensorrt)[:3])
    cc = compute_capability.replace(".", "")
    return f"{slug(gpu)}-sm{cc}-trt{version}-{precision}-b{max_batch}-{onnx_digest(onnx_sha256s)}"


def _version(text: str) -> list[str]:
    parts = text.split(".")
    if not parts or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ValueError(f"tensorrt version: expected digits separated by dots, got {describe(text)}")
    return parts


def parse_engine_sets(data: Any, models: Sequence[str], *, thumbnail: bool = False) -> tuple[EngineSet, ...]:
    """Validate the manifest's ``engines`` list.

    Args:
        data: The JSON value (None: no engines).
        models: The bundle's model names in model order (for ``one_to_one``: the location names, row-major).
        thumbnail: Whether the bundle has a thumbnail branch (every set then needs its ``thumbnail`` engine).

    Raises:
        ValueError: Naming the first bad key or value.
    """
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValueError(f"engines: expected a list, got {describe(data)}")
    sets = []
    for i, item in enumerate(data):
        where = f"engines[{i}]"
        d = check_mapping(item, where, _SET_KEYS, (*_SET_KEYS[:6], "files"))
        key = d["key"]
        if not isinstance(key, str) or _KEY.fullmatch(key) is None or ".." in key:
            raise ValueError(f"{where}.key: expected a folder name of [a-z0-9.-], got {describe(key)}")
        for name in ("gpu", "compute_capability", "tensorrt"):
            if not isinstance(d[name], str):
                raise ValueError(f"{where}.{name}: expected a string, got {describe(d[name])}")
        if re.fullmatch(r"\d{1,3}\.\d{1,3}", d["compute_capability"]) is None:
            raise ValueError(
                f"{where}.compute_capability: expected 'major.minor', got {describe(d['compute_capability'])}"
            )
        batch = check_mapping(d["batch"], f"{where}.batch", ("min", "opt", "max"), ("min", "opt", "max"))
        lo, opt, hi = (as_int(batch[k], f"{where}.batch.{k}", maximum=MAX_BATCH) for k in ("min", "opt", "max"))
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"{where}.batch: expected 1 <= min <= opt <= max, got {lo}, {opt}, {hi}")
        if d["precision"] not in PRECISIONS:
            raise ValueError(
                f"{where}.precision: expected one of {', '.join(PRECISIONS)}, got {describe(d['precision'])}"
            )
        _version(d["tensorrt"])
        compatible = d.get("version_compatible", False)
        if not isinstance(compatible, bool):
            raise ValueError(f"{where}.version_compatible: expected true or false, got {describe(compatible)}")
        if not isinstance(d["files"], list) or len(d["files"]) != len(models):
            raise ValueError(f"{where}.files: expected one engine per model {list(models)}")
        files = [
            parse_location_file(f, f"{where}.files[{j}]", name, f"engines/{key}/{name}.engine")
            for j, (f, name) in enumerate(zip(d["files"], models, strict=True))
        ]
        small = d.get("thumbnail")
        if thumbnail and small is None:
            raise ValueError(
                f"{where}.thumbnail: the bundle has a thumbnail branch, so every engine set needs its "
                f"{THUMBNAIL_ENGINE!r} engine (build the set again: tilead-export BUNDLE --trt --rebuild)"
            )
        if not thumbnail and small is not None:
            raise ValueError(f"{where}.thumbnail: an engine for a thumbnail branch the bundle does not have")
        small_file = None
        if small is not None:
            rel = f"engines/{key}/{THUMBNAIL_ENGINE}.engine"
            small_file = parse_location_file(small, f"{where}.thumbnail", THUMBNAIL_ENGINE, rel)
        cache = d.get("timing_cache")
        if cache is not None and cache != f"engines/{key}/{TIMING_CACHE}":
            raise ValueError(
                f"{where}.timing_cache: expected null or {f'engines/{key}/{TIMING_CACHE}'!r}, got {describe(cache)}"
            )
        sets.append(
            EngineSet(
                key=key,
                gpu=d["gpu"],
                compute_capability=d["compute_capability"],
                tensorrt=d["tensorrt"],
                precision=str(d["precision"]),
                batch=(lo, opt, hi),
                workspace_mib=as_int(d.get("workspace_mib", 0), f"{where}.workspace_mib", minimum=0, maximum=1 << 24),
                version_compatible=compatible,
                timing_cache=cache,
                files=tuple(files),
                thumbnail=small_file,
            )
        )
    return tuple(sets)


def runs_on(engine_set: EngineSet, gpu: str, compute_capability: str, runtime_version: str) -> bool:
    """Whether a set can run on this GPU with this TensorRT runtime.

    The GPU name and compute capability must match, and the runtime's
    major.minor.patch must be the builder's: the exporter's plans exclude the
    lean runtime, and such a plan needs the lean runtime library of its own
    TensorRT version, version-compatible or not (a later runtime would need to
    load that library, which tilead does not do).
    """
    if slug(engine_set.gpu) != slug(gpu) or engine_set.compute_capability != compute_capability:
        return False
    built = tuple(int(p) for p in _version(engine_set.tensorrt)[:3])
    here = tuple(int(p) for p in _version(runtime_version)[:3])
    return built == here


def select_engine_set(
    sets: Sequence[EngineSet],
    *,
    gpu: str,
    compute_capability: str,
    runtime_version: str,
    precision: str | None = None,
    batch: int = 1,
) -> EngineSet | None:
    """The best set for this target, or None.

    Among the sets that :func:`runs_on` this target (same TensorRT
    major.minor.patch), have the precision (any when None) and take ``batch``:
    the same full version (build number) first, then the newest build.
    """
    here = runtime_version.split(".")
    fits = [
        s
        for s in sets
        if runs_on(s, gpu, compute_capability, runtime_version)
        and (precision is None or s.precision == precision)
        and s.batch[2] >= batch
    ]
    if not fits:
        return None
    fits.sort(key=lambda s: (s.tensorrt.split(".") == here, [int(p) for p in s.tensorrt.split(".")]), reverse=True)
    return fits[0]


def describe_sets(sets: Mapping[str, EngineSet] | Sequence[EngineSet]) -> str:
    """One line per set, for error messages."""
    items = list(sets.values()) if isinstance(sets, Mapping) else list(sets)
    if not items:
        return "none"
    return "; ".join(
        f"{s.key} ({s.gpu}, sm {s.compute_capability}, TensorRT {s.tensorrt}, {s.precision})" for s in items
    )
