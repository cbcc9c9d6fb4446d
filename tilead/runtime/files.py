"""A per-location file of a bundle, with the size and hash it is verified against."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tilead.runtime._checks import as_int, check_mapping, describe

MAX_FILE_BYTES = 1 << 34
"""Largest model or engine file a manifest may list (16 GiB; ONNX protobufs stop at 2 GiB)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LocationFile:
    """One location's file in a bundle: its ONNX model, or its TensorRT engine.

    Attributes:
        name: ``rRcC``.
        file: Path relative to the bundle root.
        sha256: Hex digest of the file.
        bytes: File size.
    """

    name: str
    file: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return {"name": self.name, "file": self.file, "sha256": self.sha256, "bytes": self.bytes}


def parse_location_file(data: object, where: str, name: str, file: str) -> LocationFile:
    """Validate one manifest entry ``{"name", "file", "sha256", "bytes"}`` of location ``name``.

    Args:
        data: The JSON value.
        where: Its place in the manifest, for messages (``"locations[3]"``).
        name: The location it must describe (row-major order).
        file: The one bundle-relative file that location may use.

    Returns:
        The entry.

    Raises:
        ValueError: Naming ``where`` and the bad key: another location's name
            or file, a sha256 that is not 64 lower-case hex digits, or a size
            that is not an integer in ``[0, MAX_FILE_BYTES]``.
    """
    keys = ("name", "file", "sha256", "bytes")
    e = check_mapping(data, where, keys, keys)
    if e["name"] != name:
        raise ValueError(f"{where}.name: expected {name!r} (row-major order), got {describe(e['name'])}")
    if e["file"] != file:
        raise ValueError(f"{where}.file: location {name} must use its own file {file!r}, got {describe(e['file'])}")
    digest = e["sha256"]
    if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None:
        raise ValueError(f"{where}.sha256: expected 64 lower-case hex digits, got {describe(digest)}")
    size = as_int(e["bytes"], f"{where}.bytes", minimum=0, maximum=MAX_FILE_BYTES)
    return LocationFile(name, file, digest, size)
