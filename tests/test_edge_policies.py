"""The edge policies: one list (the extension's), and TileGrid's image <-> canvas mapping against the oracle.

The policies, their rules and their names live in ``cpp_ext/include/tilead/geometry.h``; Python's
``EDGE_POLICIES`` is the extension's tuple, and the config schema, the manifest parser and the CLI (through
the config) accept exactly those names. The mapping is checked against ``tests/reference.py``, which knows
the policies from DESIGN.md on its own.
"""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import yaml
from bundle_factory import GRID, make_bundle
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from strategies import GridCase, grids

from tilead import _kernels
from tilead.cli.main import main as tilead_main
from tilead.runtime import EDGE_POLICIES, EdgePolicy, Preprocessing, TileGrid, tile_images
from tilead.runtime.bundle import BundleError, read_manifest, write_manifest
from tilead.trainer.config import GridConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "padim_demo.yaml"
UNKNOWN = "wrap"  # a policy name nobody defines


def make(case: GridCase) -> TileGrid:
    return TileGrid(case.image, case.tile, case.stride, case.edge)


# The kernels compute bilinear source coordinates in float32 (the reference in float64): on values in
# [0, 1) and sides up to 64 that moves a resampled value by up to about 1e-4.
ATOL = 1e-4


def planes_of(case: GridCase, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *case.image), dtype=np.float32)


# -- image <-> canvas, per policy, against the reference ------------------------------------------------


@given(grids(max_size=64), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_image_to_canvas_matches_the_reference(case: GridCase, n: int, seed: int) -> None:
    grid = make(case)
    planes = planes_of(case, n, seed)
    got = grid.image_to_canvas(planes)
    want = ref.image_to_canvas(planes, case.tile, case.stride, case.edge)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (n, *grid.canvas_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@given(grids(max_size=64), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_canvas_to_image_matches_the_reference(case: GridCase, n: int, seed: int) -> None:
    grid = make(case)
    canvas = np.random.default_rng(seed).random((n, *grid.canvas_size), dtype=np.float32)
    got = grid.canvas_to_image(canvas)
    want = ref.canvas_to_image(canvas, case.image, case.edge)
    assert got.shape == want.shape == (n, *case.image)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@given(grids(max_size=64), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_image_canvas_image_round_trip(case: GridCase, n: int, seed: int) -> None:
    grid = make(case)
    planes = planes_of(case, n, seed)
    back = grid.canvas_to_image(grid.image_to_canvas(planes))
    want = ref.canvas_to_image(ref.image_to_canvas(planes, case.tile, case.stride, case.edge), case.image, case.edge)
    np.testing.assert_allclose(back, want, rtol=0, atol=ATOL)
    if case.edge != "resize":  # nothing resampled: the image comes back bit for bit
        np.testing.assert_array_equal(back, planes)


@given(grids(max_size=64), st.integers(0, 2**32 - 1))
def test_masks_stay_masks_on_the_canvas(case: GridCase, seed: int) -> None:
    grid = make(case)
    masks = np.random.default_rng(seed).random((2, *case.image)) < 0.3
    got = grid.image_to_canvas(masks)
    assert got.dtype == np.bool_
    want = ref.image_to_canvas(masks.astype(np.float64), case.tile, case.stride, case.edge)
    clear = np.abs(want - 0.5) > 1e-4  # a float32 and a float64 sample exactly at 0.5 may round either way
    np.testing.assert_array_equal(got[clear], want[clear] > 0.5)
    if case.edge != "resize":
        np.testing.assert_array_equal(grid.canvas_to_image(got.astype(np.float32)) > 0.5, masks)


@given(grids(max_size=48), st.integers(0, 2**32 - 1))
def test_the_tile_kernel_reads_the_image_through_the_same_mapping(case: GridCase, seed: int) -> None:
    """Cutting the grid's boxes out of image_to_canvas gives the tile kernel's tiles (pixel / 255)."""
    grid = make(case)
    image = np.random.default_rng(seed).integers(0, 256, (1, *case.image, 1), dtype=np.uint8)
    prep = Preprocessing(mean=(0.0,), std=(1.0,), channels=1)
    tiles = tile_images(image, grid, prep, input_order="GRAY")
    canvas = grid.image_to_canvas(image[..., 0].astype(np.float32) / np.float32(255.0))
    for index, (y0, x0, y1, x1) in enumerate(grid.boxes()):
        np.testing.assert_allclose(tiles[index, 0, 0], canvas[0, y0:y1, x0:x1], rtol=1e-5, atol=1e-6)


def test_the_shift_canvas_is_the_image_itself() -> None:
    grid = TileGrid(60, 40, 24)  # shift: the canvas is the image
    planes = np.zeros((1, 60, 60), np.float32)
    assert grid.image_to_canvas(planes) is planes
    assert grid.canvas_to_image(planes) is planes


def test_a_grid_that_fits_needs_no_mapping_under_any_policy() -> None:
    planes = np.arange(64 * 64, dtype=np.float32).reshape(1, 64, 64)
    for name in EDGE_POLICIES:
        grid = TileGrid(64, 40, 24, edge=name)  # 0 + 24 + 40 = 64: the tiles end at the edge
        assert grid.canvas_size == grid.image_size
        assert grid.image_to_canvas(planes) is planes
        assert grid.canvas_to_image(planes) is planes


def test_image_to_canvas_names_what_is_wrong() -> None:
    grid = TileGrid(60, 40, 24, edge="pad")  # canvas 64 x 64
    with pytest.raises(ValueError, match=re.escape("planes: expected dtype float32 or bool, got uint8")):
        grid.image_to_canvas(np.zeros((1, 60, 60), np.uint8))
    with pytest.raises(ValueError, match=re.escape("planes[0]: expected shape (60, 60) (image_h, image_w)")):
        grid.image_to_canvas(np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="planes: expected 3 dimensions"):
        grid.image_to_canvas(np.zeros((60, 60), np.float32))


# -- the one list ----------------------------------------------------------------------------------------


def test_python_takes_the_list_from_the_extension() -> None:
    assert EDGE_POLICIES == _kernels.EDGE_POLICIES
    assert len(set(EDGE_POLICIES)) == len(EDGE_POLICIES) > 0
    assert typing.get_args(EdgePolicy) == EDGE_POLICIES  # the run-time Literal pydantic validates against
    codes = {name for name in dir(_kernels) if name.startswith("EDGE_")}
    assert codes == {"EDGE_POLICIES"} | {f"EDGE_{name.upper()}" for name in EDGE_POLICIES}
    for code, name in enumerate(EDGE_POLICIES):
        assert getattr(_kernels, f"EDGE_{name.upper()}") == code
        grid = TileGrid(60, 40, 24, edge=name)
        assert grid.edge == name
        assert grid.native.edge == code
    known = ", ".join(f"{code} ({name})" for code, name in enumerate(EDGE_POLICIES[:-1]))
    known += f" or {len(EDGE_POLICIES) - 1} ({EDGE_POLICIES[-1]})"
    for code in (-1, len(EDGE_POLICIES)):
        with pytest.raises(ValueError, match=re.escape(f"grid: edge must be {known}, got {code}")):
            _kernels.Grid(60, 60, 40, 40, 24, 24, code)
    with pytest.raises(ValueError, match=re.escape(f"edge: expected one of {', '.join(EDGE_POLICIES)}, got 'wrap'")):
        TileGrid(60, 40, 24, edge=UNKNOWN)


def test_the_config_schema_takes_its_names_from_the_list() -> None:
    assert tuple(GridConfig.model_json_schema()["properties"]["edge"]["enum"]) == EDGE_POLICIES
    for name in EDGE_POLICIES:
        assert GridConfig(tile_size=40, stride=24, edge=name).build((60, 60)).edge == name
    with pytest.raises(ValidationError, match="edge"):
        GridConfig(tile_size=40, edge=UNKNOWN)


def test_the_manifest_parser_takes_its_names_from_the_list(tmp_path: Path) -> None:
    for name in EDGE_POLICIES:
        bundle = make_bundle(tmp_path / name, grid_data={**GRID, "edge": name})
        assert read_manifest(bundle).grid.edge == name
    data = json.loads((bundle / "manifest.json").read_text())
    data["grid"]["edge"] = UNKNOWN
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=re.escape(f"edge: expected one of {', '.join(EDGE_POLICIES)}")):
        read_manifest(bundle)


def test_the_cli_takes_its_names_from_the_list() -> None:
    runner = CliRunner()
    for name in EDGE_POLICIES:
        args = ["train", "--config", str(CONFIG), "--set", f"grid.edge={name}", "--print-config"]
        res = runner.invoke(tilead_main, args)
        assert res.exit_code == 0, res.output
        assert yaml.safe_load(res.output)["grid"]["edge"] == name
    res = runner.invoke(
        tilead_main, ["train", "--config", str(CONFIG), "--set", f"grid.edge={UNKNOWN}", "--print-config"]
    )
    assert res.exit_code != 0
    assert "grid.edge" in res.output
    for name in EDGE_POLICIES:
        assert repr(name) in res.output


def _name_lists(tree: ast.AST) -> list[int]:
    """Lines of tuple, list and set displays that hold two or more policy names as string constants."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in EDGE_POLICIES]
            if len(names) >= 2:
                lines.append(node.lineno)
    return lines


def test_no_second_list_of_policy_names_in_the_sources() -> None:
    """No list of policy names (tuple, list, set, Literal) in Python sources; none in C++ but geometry.h's.

    Such a list would be a second one that can drift from the extension's.
    """
    found = []
    for path in sorted(p for folder in ("tilead", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{line}" for line in _name_lists(ast.parse(path.read_text()))]
    header = ROOT / "cpp_ext" / "include" / "tilead" / "geometry.h"
    for path in sorted((ROOT / "cpp_ext").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu") and path != header:
            text = path.read_text()
            found += [f"{path.relative_to(ROOT)}: {name!r}" for name in EDGE_POLICIES if f'"{name}"' in text]
    assert not found, f"policy names listed outside the one list: {found}"
    # The check itself finds such a list.
    assert _name_lists(ast.parse('EDGES = ("shift", "pad")\nx: Literal["pad", "resize", "reflect"]')) == [1, 2]
