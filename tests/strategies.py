"""Hypothesis strategies for grids and kernel inputs."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st


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
def grids(draw: st.DrawFn, max_size: int = 48, edges: tuple[str, ...] = ("shift", "pad", "resize")) -> GridCase:
    h, th, sh = draw(axes(max_size))
    w, tw, sw = draw(axes(max_size))
    edge = draw(st.sampled_from(edges))
    return GridCase((h, w), (th, tw), (sh, sw), edge)
