"""Task assignment: which tile locations share one fitted model (``grid.assignment``).

Modes (HiAD's names, decided per location at fit time, fixed in the bundle):

* ``one_to_one`` (default): a model per location, named after it (``r0c1``).
* ``all_to_one``: one model for every location.
* ``neighbourhood``: blocks of ``k x k`` neighbouring locations share a model
  (the last row or column of blocks is smaller where ``k`` does not divide the grid).
* ``cluster``: k-means (scikit-learn, seeded, ``k`` clusters) over every
  location's mean embedding of its training tiles (the run's backbone features,
  averaged over positions and tiles); locations of one cluster share a model.
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
from tilead.runtime import TileGrid

MODES = ("one_to_one", "all_to_one", "neighbourhood", "cluster", "retrieve")
FILE = "assignment.json"
RETRIEVE_REFUSAL = (
    "grid.assignment 'retrieve' (HiAD's rule: every test tile is scored by the model whose training tiles it is "
    "closest to) is not available: the model is chosen per test tile at inference, from that tile's own "
    "embedding, so a bundle would need a router graph that computes the embedding, compares it with every "
    "model's training tiles and then runs a different model per tile; the runtime's fixed location -> model "
    "table (one batched call per model, one TensorRT engine per model) cannot express that, and a router that "
    "runs every model on every tile costs the work of all models on each tile. Use 'cluster': the same "
    "nearest-training-tiles idea decided per location at fit time, which keeps one batched call per model"
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
    """

    mode: str
    location_model: tuple[int, ...]
    names: tuple[str, ...]

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
        """Plain data (``assignment.json``)."""
        return {"mode": self.mode, "location_model": list(self.location_model), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Any, num_locations: int) -> Assignment:
        """Validate ``assignment.json`` content for a grid of ``num_locations``.

        Raises:
            AssignmentError: For a malformed table (an unmapped location, an unused model, unknown keys).
        """
        if not isinstance(data, dict) or set(data) != {"mode", "location_model", "names"}:
            raise AssignmentError(f"{FILE}: expected keys mode, location_model, names; got {data!r:.200}")
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
        return cls(str(data["mode"]), tuple(table), tuple(names))


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
) -> Assignment:
    """The run's table: the saved one, else computed (``cluster`` calls ``embed``) and saved.

    Args:
        mode: ``grid.assignment.mode``.
        k: ``grid.assignment.k``.
        seed: The run's seed (k-means).
        grid: The tile grid.
        root: Run folder (``assignment.json``).
        embed: Per-location mean embeddings ``(locations, d)``; needed for ``cluster`` without a saved table.

    Raises:
        AssignmentError: Bad settings, a saved table of another mode, or ``cluster`` without ``embed``.
    """
    check_assignment(mode, k, grid)
    saved = load_assignment(root, grid.num_locations)
    if saved is not None:
        if saved.mode != mode:
            raise AssignmentError(f"{Path(root) / FILE}: holds a {saved.mode!r} table, the config asks for {mode!r}")
        return saved
    if mode == "cluster":
        if embed is None:
            raise AssignmentError(f"{Path(root) / FILE} is missing: a cluster run's table is made when it is fitted")
        assert k is not None
        table = cluster_assignment(embed(), k, seed)
    else:
        table = fixed_assignment(mode, k, grid)
    if mode != "one_to_one":
        save_assignment(root, table)
    return table
