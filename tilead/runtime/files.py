"""A per-location file of a bundle, with the size and hash it is verified against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
