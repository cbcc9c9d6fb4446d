"""Tile geometry: which tiles an image is cut into, and where they sit.

``TileGrid`` is the single description of a tiling that the trainer, the
exporter (it is written into the bundle) and the runtime share. Tile origins
come from the extension's geometry header, the same index math the tile and
untile kernels run, so there is exactly one definition of tile positions.

Along each axis, tiles of ``tile`` pixels start at 0, stride, 2*stride, ...
while they fit. If the last one does not reach the edge, the ``edge`` policy
adds one more:

* ``shift`` (default): a tile at ``size - tile``; every pixel is covered and
  nothing is resized. The canvas is the image.
* ``pad``: a tile at ``n * stride``; the image is zero-padded right/bottom to
  the canvas ``(n - 1) * stride + tile`` and maps are cropped back.
* ``resize``: a tile at ``n * stride``; the image is resized (bilinear) to that
  canvas and maps are resized back.

The policies, their origin and canvas rules and the image <-> canvas mapping
are defined once, in the extension's geometry header
(``cpp_ext/include/tilead/geometry.h``); :data:`EDGE_POLICIES` is its list of
names, and :meth:`TileGrid.image_to_canvas` / :meth:`TileGrid.canvas_to_image`
are the Python side of its mapping (the tile kernels apply it to images on the
fly, the device pipeline's crop to maps on the GPU).

Locations are indexed (row, col), row-major, and named ``rRcC``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tilead import _kernels
from tilead.runtime._checks import as_pair, check_array, check_mapping, check_shape, describe
from tilead.runtime.devices import kernel_family

EDGE_POLICIES: tuple[str, ...] = tuple(_kernels.EDGE_POLICIES)
"""Names of the edge policies, indexed by code: the extension's one list (``TILEAD_EDGE_POLICIES``)."""
_EDGE_CODES = {name: code for code, name in enumerate(EDGE_POLICIES)}
if TYPE_CHECKING:
    EdgePolicy = str
else:
    EdgePolicy = Literal[EDGE_POLICIES]
    """An edge policy name; at run time the ``Literal`` of :data:`EDGE_POLICIES` (pydantic validates against it)."""
_LOCATION_RE = re.compile(r"^r(\d+)c(\d+)$")
_DICT_KEYS = ("image_size", "tile_size", "stride", "edge")
MAX_SIDE = 1 << 16
"""Largest image, tile or stride side in pixels (a bound checked before the extension allocates anything)."""


class TileGrid:
    """A validated grid of tiles over an image of fixed size.

    Args:
        image_size: Image size as ``(height, width)`` or one int for a square.
        tile_size: Tile size as ``(height, width)`` or one int.
        stride: Distance between tile origins, ``(height, width)`` or one int;
            defaults to the tile size (no overlap). Must not exceed the tile.
        edge: What to do when the tiles do not end at the image edge, one
            of :data:`EDGE_POLICIES`: ``"shift"``, ``"pad"`` or ``"resize"``.

    Raises:
        ValueError: For non-integer, non-positive or larger than
            :data:`MAX_SIDE` sizes, a stride larger
            than the tile, a tile larger than the image, or an unknown edge
            policy; the message names the argument and the value given.

    Example:
        >>> grid = TileGrid(900, 448, stride=448)
        >>> grid.rows, grid.cols, grid.origins_y
        (3, 3, (0, 448, 452))
    """

    __slots__ = ("_edge", "_image", "_native", "_stride", "_tile")

    def __init__(
        self,
        image_size: int | tuple[int, int],
        tile_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        edge: EdgePolicy = "shift",
    ) -> None:
        image = as_pair(image_size, "image_size", maximum=MAX_SIDE)
        tile = as_pair(tile_size, "tile_size", maximum=MAX_SIDE)
        step = tile if stride is None else as_pair(stride, "stride", maximum=MAX_SIDE)
        if not isinstance(edge, str) or edge not in _EDGE_CODES:
            raise ValueError(f"edge: expected one of {', '.join(EDGE_POLICIES)}, got {describe(edge)}")
        for axis, i in (("height", 0), ("width", 1)):
            if step[i] > tile[i]:
                raise ValueError(
                    f"stride: the {axis} stride ({step[i]}) must not exceed the tile {axis} ({tile[i]}), "
                    "or pixels between tiles would be skipped"
                )
            if tile[i] > image[i]:
                raise ValueError(
                    f"tile_size: the tile {axis} ({tile[i]}) must not exceed the image {axis} ({image[i]})"
                )
        self._image = image
        self._tile = tile
        self._stride = step
        self._edge: EdgePolicy = edge
        self._native = _kernels.Grid(*image, *tile, *step, _EDGE_CODES[edge])

    # -- construction from / to plain data ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written into manifests and run folders."""
        return {
            "image_size": list(self._image),
            "tile_size": list(self._tile),
            "stride": list(self._stride),
            "edge": self._edge,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TileGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Args:
            data: Mapping with ``image_size``, ``tile_size``, ``stride`` and
                optionally ``edge`` (default ``"shift"``).

        Returns:
            The grid.

        Raises:
            ValueError: For a non-mapping, missing or unknown keys, or invalid
                values.
        """
        data = check_mapping(data, "grid", _DICT_KEYS, required=("image_size", "tile_size", "stride"))
        return cls(data["image_size"], data["tile_size"], data["stride"], data.get("edge", "shift"))

    # -- sizes ---------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """Image ``(height, width)`` the grid was made for."""
        return self._image

    @property
    def tile_size(self) -> tuple[int, int]:
        """Tile ``(height, width)``."""
        return self._tile

    @property
    def stride(self) -> tuple[int, int]:
        """Distance between tile origins, ``(height, width)``."""
        return self._stride

    @property
    def edge(self) -> EdgePolicy:
        """Edge policy, one of :data:`EDGE_POLICIES`."""
        return self._edge

    @property
    def rows(self) -> int:
        """Number of tile rows."""
        return int(self._native.rows)

    @property
    def cols(self) -> int:
        """Number of tile columns."""
        return int(self._native.cols)

    @property
    def num_locations(self) -> int:
        """Number of tile locations (``rows * cols``), one model each."""
        return self.rows * self.cols

    @property
    def canvas_size(self) -> tuple[int, int]:
        """Size ``(height, width)`` of the plane the tiles cover.

        The image size for ``shift``; the padded or resized size otherwise.
        """
        return int(self._native.canvas_h), int(self._native.canvas_w)

    @property
    def origins_y(self) -> tuple[int, ...]:
        """Canvas row of each tile row's top edge."""
        return tuple(int(v) for v in self._native.origins_y)

    @property
    def origins_x(self) -> tuple[int, ...]:
        """Canvas column of each tile column's left edge."""
        return tuple(int(v) for v in self._native.origins_x)

    # -- image <-> canvas (the edge policy's mapping, geometry.h) -------------------------------------

    def image_to_canvas(self, planes: np.ndarray, *, device: str = "cpu") -> np.ndarray:
        """Bring image-size planes onto the canvas, as the tile kernel brings the images.

        The canvas is the image (``shift``, or a grid that fits): ``planes``
        is returned as is. ``pad``: zero-padded right and bottom. ``resize``:
        bilinear resize to the canvas (a bool mask is resampled as 0/1 and
        thresholded at 0.5, so it stays a mask).

        Args:
            planes: float32 or bool ``(n, H, W)`` at the grid's image size,
                e.g. ground-truth masks.
            device: ``"cpu"`` or ``"cuda"`` (used by ``resize``).

        Returns:
            ``(n, canvas_h, canvas_w)`` of the same dtype.

        Raises:
            ValueError: For a wrong dtype, rank or size.
        """
        check_array(planes, "planes", dtypes=[np.float32, np.bool_], ndims=[3], contiguous=False)
        check_shape(planes[0], "planes[0]", self._image, "(image_h, image_w)")
        mapping = self._native.canvas_map
        if mapping == _kernels.CANVAS_IS_IMAGE:
            return planes
        ch, cw = self.canvas_size
        if mapping == _kernels.CANVAS_PADDED:
            out = np.zeros((planes.shape[0], ch, cw), dtype=planes.dtype)
            out[:, : self._image[0], : self._image[1]] = planes
            return out
        values = np.ascontiguousarray(planes, dtype=np.float32)
        resized = np.empty((planes.shape[0], ch, cw), dtype=np.float32)
        kernel_family(device).resize_maps(values, resized)
        return resized > 0.5 if planes.dtype == np.bool_ else resized

    def canvas_to_image(self, maps: np.ndarray, *, device: str = "cpu", out: np.ndarray | None = None) -> np.ndarray:
        """Bring canvas maps back to the image size.

        The canvas is the image (``shift``, or a grid that fits): returned as
        is. ``pad``: the padding is cropped off. ``resize``: the canvas is
        resized (bilinear) to the image size.

        Args:
            maps: float32 ``(n, canvas_h, canvas_w)``.
            device: ``"cpu"`` or ``"cuda"`` (used by ``resize``).
            out: float32 ``(n, H, W)`` C-contiguous array to write a cropped or resized map into
                (unused when the canvas is the image); None: a new one.

        Returns:
            float32 ``(n, H, W)``, C-contiguous.

        Raises:
            ValueError: For a wrong dtype, rank or size, or non-contiguous memory.
        """
        check_array(maps, "maps", dtypes=[np.float32], ndims=[3])
        check_shape(maps[0], "maps[0]", self.canvas_size, "(canvas_h, canvas_w)")
        mapping = self._native.canvas_map
        if mapping == _kernels.CANVAS_IS_IMAGE:
            return maps
        h, w = self._image
        if out is None:
            out = np.empty((maps.shape[0], h, w), dtype=np.float32)
        else:
            check_array(out, "out", dtypes=[np.float32], ndims=[3], writable=True)
            check_shape(out, "out", (maps.shape[0], h, w), "(n, H, W)")
        if mapping == _kernels.CANVAS_RESIZED:
            kernel_family(device).resize_maps(maps, out)
        else:
            np.copyto(out, maps[:, :h, :w])
        return out

    # -- locations -----------------------------------------------------------------------------------

    def locations(self) -> list[tuple[int, int]]:
        """All ``(row, col)`` locations in row-major order (index = row * cols + col)."""
        return [(r, c) for r in range(self.rows) for c in range(self.cols)]

    def location_names(self) -> list[str]:
        """``rRcC`` names of all locations, row-major."""
        return [location_name(r, c) for r, c in self.locations()]

    def location_index(self, row: int, col: int) -> int:
        """Row-major index of location ``(row, col)``.

        Raises:
            ValueError: When the location is outside the grid.
        """
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"location ({row}, {col}) is outside the grid of {self.rows} rows x {self.cols} cols")
        return row * self.cols + col

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Canvas box ``(y0, x0, y1, x1)`` (end-exclusive) of location ``(row, col)``."""
        self.location_index(row, col)
        y0 = self.origins_y[row]
        x0 = self.origins_x[col]
        return y0, x0, y0 + self._tile[0], x0 + self._tile[1]

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Canvas boxes of all locations, row-major."""
        return [self.box(r, c) for r, c in self.locations()]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.locations())

    def __len__(self) -> int:
        return self.num_locations

    # -- value semantics ----------------------------------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        return (self._image, self._tile, self._stride, self._edge)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TileGrid) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"TileGrid(image_size={self._image}, tile_size={self._tile}, stride={self._stride}, "
            f"edge={self._edge!r})  # {self.rows}x{self.cols} locations, canvas {self.canvas_size}"
        )

    @property
    def native(self) -> Any:
        """The extension's validated ``Grid`` handed to the kernels."""
        return self._native


def location_name(row: int, col: int) -> str:
    """Name of location ``(row, col)``: ``"r{row}c{col}"``."""
    return f"r{row}c{col}"


def parse_location(name: str) -> tuple[int, int]:
    """Inverse of :func:`location_name`.

    Raises:
        ValueError: When ``name`` is not of the form ``rRcC``.
    """
    match = _LOCATION_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"location name: expected 'r<row>c<col>' such as 'r0c1', got {describe(name)}")
    return int(match.group(1)), int(match.group(2))
