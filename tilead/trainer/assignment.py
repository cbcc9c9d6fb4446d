"""Task assignment: which tile locations share one fitted model (``grid.assignment``).

Modes (HiAD's names, decided per location at fit time, fixed in the bundle):

* ``one_to_one`` (default): a model per location, named after it (``r0c1``).
* ``all_to_one``: one model for every location.
* ``neighbourhood``: blocks of ``k x k`` neighbouring locations share a model
  (the last row or column of blocks is smaller where ``k`` does not divide the grid).
* ``cluster``: k-means (scikit-learn, seeded, ``k`` clusters) over every
  location's mean embedding of its training tiles (the run's backbone features,
  averaged over positions and tiles); locations of one cluster share a model.
* ``cluster`` with ``orient``: locations are grouped by their mean training tile
  after the best of the 8 flips / quarter turns (average-linkage clustering of
  those distances); each location keeps the transform that aligns it with its
  group's medoid, and its tiles are transformed before the shared model and the
  map transformed back (:mod:`tilead.runtime.orientation`).
* ``retrieve`` (HiAD's rule: each *test tile* is scored by the model whose
  training tiles it is closest to) is refused, see :data:`RETRIEVE_REFUSAL`.

Shared models are named ``m0``, ``m1``, ... (row-major order of their first
location) and are fitted on the union of their locations' tiles. The table is
saved as ``assignment.json`` in the run folder (``cluster`` depends on the data),
read by evaluation and export, and written into the bundle's manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilead.atomic import atomic_write_text
from tilead.runtime import TileGrid, orientation

MODES = ("one_to_one", "all_to_one", "neighbourhood", "cluster", "retrieve")
FILE = "assignment.json"
RETRIEVE_REFUSAL = (
    "grid.assignment 'retrieve' (HiAD's rule: every test tile is scored by the model whose training tiles it is "
    "closest to) is not available: the model is chosen per test tile at inference, from that tile's own "
    "embedding, so a bundle would need a router graph that computes the embedding, compares it with every "
    "model's training tiles and then runs a different model per tile; the runtime's fixed location -> model "
    "table (each location's model fixed at export, one TensorRT engine per model) cannot express that, and a "
    "router that runs every model on every tile costs the work of all models on each tile. Use 'cluster': the same "
    "nearest-training-tiles idea decided per location at fit time, which keeps the table fixed"
)


class AssignmentError(ValueError):
    """Assignment settings that do not fit the grid (the message names the key and the limit)."""


@dataclass(frozen=True)
class Assignment:
    """Location -> model table of a run.

    Attributes:
        mode: One of :data:`MODES` (never ``retrieve``).
        location_model: Model index of every location, row-major.
        names: Model names (``rRcC`` for ``one_to_one``, else ``m0``, ``m1``, ...).
        transforms: Orientation of every location (:mod:`tilead.runtime.orientation` index), row-major;
            empty unless ``cluster`` with ``orient``.
    """

    mode: str
    location_model: tuple[int, ...]
    names: tuple[str, ...]
    transforms: tuple[int, ...] = ()

    def transform(self, location: int) -> int:
        """The orientation of a location's tiles (0: as cut)."""
        return self.transforms[location] if self.transforms else 0

    @property
    def num_models(self) -> int:
        """Number of models."""
        return len(self.names)

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Location indices of every model (row-major inside a group)."""
        out: list[list[int]] = [[] for _ in self.names]
        for loc, model in enumerate(self.location_model):
            out[model].append(loc)
        return tuple(tuple(g) for g in out)

    @property
    def shared(self) -> bool:
        """Whether models are named ``m0``, ``m1``, ... (every mode but ``one_to_one``): the bundle gets a table."""
        return self.mode != "one_to_one"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``assignment.json``; ``transforms`` only when oriented)."""
        data: dict[str, Any] = {"mode": self.mode, "location_model": list(self.location_model)}
        data["names"] = list(self.names)
        if self.transforms:
            data["transforms"] = list(self.transforms)
        return data

    @classmethod
    def from_dict(cls, data: Any, num_locations: int) -> Assignment:
        """Validate ``assignment.json`` content for a grid of ``num_locations``.

        Raises:
            AssignmentError: For a malformed table (an unmapped location, an unused model, unknown keys).
        """
        keys = {"mode", "location_model", "names"}
        if not isinstance(data, dict) or not keys <= set(data) <= keys | {"transforms"}:
            raise AssignmentError(
                f"{FILE}: expected keys mode, location_model, names (and transforms); got {data!r:.200}"
            )
        names = data["names"]
        table = data["location_model"]
        if data["mode"] not in MODES or data["mode"] == "retrieve":
            raise AssignmentError(f"{FILE}: unknown mode {data['mode']!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AssignmentError(f"{FILE}: names: expected a list of strings")
        if not isinstance(table, list) or len(table) != num_locations:
            raise AssignmentError(f"{FILE}: location_model: expected {num_locations} model indices (one per location)")
        if not all(type(i) is int and 0 <= i < len(names) for i in table):
            raise AssignmentError(f"{FILE}: location_model: expected indices in [0, {len(names)})")
        if set(table) != set(range(len(names))):
            raise AssignmentError(f"{FILE}: every model must serve at least one location")
        transforms = data.get("transforms", [])
        if "transforms" in data and (
            data["mode"] != "cluster"
            or not isinstance(transforms, list)
            or len(transforms) != num_locations
            or not all(type(t) is int and 0 <= t < orientation.COUNT for t in transforms)
        ):
            raise AssignmentError(
                f"{FILE}: transforms: expected {num_locations} orientation indices in [0, {orientation.COUNT}) "
                f"(mode cluster only)"
            )
        return cls(str(data["mode"]), tuple(table), tuple(names), tuple(transforms))


def _canonical(mode: str, labels: Sequence[int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Renumber models in row-major order of their first location; names ``m0``, ``m1``, ..."""
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    table = tuple(order[int(label)] for label in labels)
    return table, tuple(f"m{i}" for i in range(len(order)))


def check_assignment(mode: str, k: int | None, grid: TileGrid) -> None:
    """Check ``grid.assignment`` against the grid it will be applied to.

    Raises:
        AssignmentError: ``retrieve`` (see :data:`RETRIEVE_REFUSAL`), a neighbourhood
            larger than the grid, more clusters than locations, or ``k`` missing / given where unused.
    """
    if mode not in MODES:
        raise AssignmentError(f"grid.assignment.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "retrieve":
        raise AssignmentError(RETRIEVE_REFUSAL)
    if mode in ("neighbourhood", "cluster"):
        if k is None:
            raise AssignmentError(f"grid.assignment.k: mode {mode!r} needs k (an integer >= 1)")
        if k < 1:
            raise AssignmentError(f"grid.assignment.k: expected an integer >= 1, got {k}")
    elif k is not None:
        raise AssignmentError(f"grid.assignment.k: mode {mode!r} takes no k (got {k}); k is for neighbourhood/cluster")
    if mode == "neighbourhood" and k is not None and k > max(grid.rows, grid.cols):
        raise AssignmentError(
            f"grid.assignment.k: a {k} x {k} neighbourhood is larger than the {grid.rows} x {grid.cols} grid "
            f"(k at most {max(grid.rows, grid.cols)}; k = {max(grid.rows, grid.cols)} is all_to_one)"
        )
    if mode == "cluster" and k is not None and k > grid.num_locations:
        raise AssignmentError(
            f"grid.assignment.k: {k} clusters but the {grid.rows} x {grid.cols} grid has only "
            f"{grid.num_locations} locations"
        )


def fixed_assignment(mode: str, k: int | None, grid: TileGrid) -> Assignment:
    """The table of a mode that does not depend on the data (every mode but ``cluster``).

    Raises:
        AssignmentError: As :func:`check_assignment`, or for ``cluster`` (use :func:`cluster_assignment`).
    """
    check_assignment(mode, k, grid)
    locations = grid.locations()
    if mode == "one_to_one":
        names = tuple(grid.location_names())
        return Assignment(mode, tuple(range(len(names))), names)
    if mode == "all_to_one":
        labels = [0] * len(locations)
    elif mode == "neighbourhood":
        assert k is not None
        blocks_per_row = -(-grid.cols // k)
        labels = [(r // k) * blocks_per_row + c // k for r, c in locations]
    else:
        raise AssignmentError(f"grid.assignment.mode {mode!r} depends on the training tiles (cluster_assignment)")
    table, names = _canonical(mode, labels)
    return Assignment(mode, table, names)


def cluster_assignment(embeddings: np.ndarray, k: int, seed: int) -> Assignment:
    """k-means over per-location mean embeddings (scikit-learn ``KMeans``, ``n_init`` 10, seeded).

    Args:
        embeddings: float ``(locations, d)``.
        k: Clusters (models), ``1 <= k <= locations``.
        seed: k-means seed.

    Returns:
        The table; models renumbered row-major. Fewer than ``k`` models only
        when several locations have identical embeddings (an empty cluster cannot be fitted).

    Raises:
        AssignmentError: For ``k`` outside ``[1, locations]`` or non-finite embeddings.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise AssignmentError(f"cluster: expected embeddings (locations, d), got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise AssignmentError(f"grid.assignment.k: {k} clusters for {x.shape[0]} locations (expected 1..{x.shape[0]})")
    if not np.isfinite(x).all():
        raise AssignmentError("cluster: the location embeddings are not finite")
    distinct = len(np.unique(x, axis=0))
    labels = KMeans(n_clusters=min(k, distinct), n_init=10, random_state=seed).fit_predict(x)
    table, names = _canonical("cluster", labels.tolist())
    return Assignment("cluster", table, names)


def oriented_cluster_assignment(mean_tiles: np.ndarray, k: int) -> Assignment:
    """Group locations by their mean tile after the best orientation; each keeps the transform to its medoid.

    The distance of two locations is the smallest Euclidean distance between one's mean tile and the
    other's under any allowed transform (:func:`tilead.runtime.orientation.allowed`); average-linkage
    clustering (scikit-learn, deterministic) of those distances makes ``k`` groups. In each group the
    medoid keeps its tiles as cut, every other location the transform that brings its mean tile closest
    to the medoid's.

    Args:
        mean_tiles: float ``(locations, C, h, w)``: every location's mean training tile (any resolution).
        k: Clusters (models), ``1 <= k <= locations``.

    Returns:
        The table with ``transforms``; models renumbered row-major.

    Raises:
        AssignmentError: For ``k`` outside ``[1, locations]``, another shape or non-finite values.
    """
    from sklearn.cluster import AgglomerativeClustering

    x = np.asarray(mean_tiles, dtype=np.float64)
    if x.ndim != 4 or x.shape[0] < 1:
        raise AssignmentError(f"cluster (orient): expected mean tiles (locations, C, h, w), got shape {x.shape}")
    count = x.shape[0]
    if not 1 <= k <= count:
        raise AssignmentError(f"grid.assignment.k: {k} clusters for {count} locations (expected 1..{count})")
    if not np.isfinite(x).all():
        raise AssignmentError("cluster (orient): the mean tiles are not finite")
    choices = orientation.allowed(x.shape[2], x.shape[3])
    # dist[a, b, j]: location a against location b under transform choices[j].
    dist = np.stack(
        [
            np.sqrt(((x[:, None] - np.stack([orientation.apply(m, t) for m in x])[None]) ** 2).sum(axis=(2, 3, 4)))
            for t in choices
        ],
        axis=2,
    )
    best = dist.min(axis=2)
    best = np.minimum(best, best.T)
    if k == count:
        labels = list(range(count))
    elif k == 1:
        labels = [0] * count
    else:
        cl = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
        labels = [int(v) for v in cl.fit_predict(best)]
    transforms = [0] * count
    for label in set(labels):
        group = [i for i, v in enumerate(labels) if v == label]
        medoid = min(group, key=lambda a: (float(best[a, group].sum()), a))
        for loc in group:
            transforms[loc] = 0 if loc == medoid else choices[int(dist[medoid, loc].argmin())]
    table, names = _canonical("cluster", labels)
    return Assignment("cluster", table, names, tuple(transforms))


def mean_embeddings(batches: Iterable[np.ndarray], num_locations: int) -> np.ndarray:
    """Per-location mean of pooled tile embeddings.

    Args:
        batches: float ``(locations, n, d)`` per image batch (each tile's features averaged over positions).
        num_locations: Expected number of locations.

    Returns:
        float64 ``(locations, d)``.

    Raises:
        AssignmentError: If no batch came or a batch has another number of locations.
    """
    total: np.ndarray | None = None
    count = 0
    for b in batches:
        if b.ndim != 3 or b.shape[0] != num_locations:
            raise AssignmentError(f"cluster: expected embeddings ({num_locations}, n, d), got {b.shape}")
        s = b.astype(np.float64).sum(axis=1)
        total = s if total is None else total + s
        count += b.shape[1]
    if total is None or count == 0:
        raise AssignmentError("cluster: no training tiles to embed")
    return total / count


def save_assignment(root: Path, assignment: Assignment) -> None:
    """Write ``root/assignment.json`` atomically."""
    atomic_write_text(Path(root) / FILE, json.dumps(assignment.to_dict(), indent=2) + "\n")


def load_assignment(root: Path, num_locations: int) -> Assignment | None:
    """Read ``root/assignment.json`` (None when absent).

    Raises:
        AssignmentError: For a file that is not valid JSON or not a valid table.
    """
    path = Path(root) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AssignmentError(f"{path}: not valid JSON ({err})") from None
    return Assignment.from_dict(data, num_locations)


def resolve_assignment(
    mode: str,
    k: int | None,
    seed: int,
    grid: TileGrid,
    root: Path,
    embed: Callable[[], np.ndarray] | None = None,
    *,
    orient: bool = False,
) -> Assignment:
    """The run's table: the saved one, else computed (``cluster`` calls ``embed``) and saved.

    Args:
        mode: ``grid.assignment.mode``.
        k: ``grid.assignment.k``.
        seed: The run's seed (k-means).
        grid: The tile grid.
        root: Run folder (``assignment.json``).
        embed: Per-location mean embeddings ``(locations, d)``, or with ``orient`` mean tiles
            ``(locations, C, h, w)``; needed for ``cluster`` without a saved table.
        orient: ``cluster`` with orientations (:func:`oriented_cluster_assignment`).

    Raises:
        AssignmentError: Bad settings, a saved table of another mode, or ``cluster`` without ``embed``.
    """
    check_assignment(mode, k, grid)
    saved = load_assignment(root, grid.num_locations)
    if saved is not None:
        if saved.mode != mode or bool(saved.transforms) != orient:
            have = f"{saved.mode!r}{' (orient)' if saved.transforms else ''}"
            want = f"{mode!r}{' (orient)' if orient else ''}"
            raise AssignmentError(f"{Path(root) / FILE}: holds a {have} table, the config asks for {want}")
        return saved
    if mode == "cluster":
        if embed is None:
            raise AssignmentError(f"{Path(root) / FILE} is missing: a cluster run's table is made when it is fitted")
        assert k is not None
        table = oriented_cluster_assignment(embed(), k) if orient else cluster_assignment(embed(), k, seed)
    else:
        table = fixed_assignment(mode, k, grid)
    if mode != "one_to_one":
        save_assignment(root, table)
    return table
