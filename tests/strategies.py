"""Hypothesis strategies for grids and kernel inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tilead.runtime.geometry import EDGE_POLICIES


@dataclass(frozen=True)
class GridCase:
    image: tuple[int, int]
    tile: tuple[int, int]
    stride: tuple[int, int]
    edge: str


@st.composite
def axes(draw: st.DrawFn, max_size: int = 48) -> tuple[int, int, int]:
    size = draw(st.integers(1, max_size))
    tile = draw(st.integers(1, size))
    stride = draw(st.integers(1, tile))
    return size, tile, stride


@st.composite
def grids(draw: st.DrawFn, max_size: int = 48, edges: tuple[str, ...] = EDGE_POLICIES) -> GridCase:
    h, th, sh = draw(axes(max_size))
    w, tw, sw = draw(axes(max_size))
    edge = draw(st.sampled_from(edges))
    return GridCase((h, w), (th, tw), (sh, sw), edge)


def json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a parsed JSON value (dict keys and list indices), depth first, the root excluded."""
    out = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        out.extend(json_paths(child, (*prefix, key)))
    return out
