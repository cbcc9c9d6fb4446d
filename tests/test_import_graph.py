"""The package's imports form no cycle, and every module imports whatever was imported before it (issue #15).

The static check reads every import statement of ``tilead`` with grimp (module-level, function-level and
``TYPE_CHECKING`` imports alike) and sorts the graph topologically. The dynamic check imports every module
in a fresh interpreter, once in alphabetical order and once in reverse, so that a module that only imports
after some other one fails in one of the two.
"""

from __future__ import annotations

import graphlib
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_names() -> list[str]:
    """Every module of the ``tilead`` source tree (``__main__`` modules left out: importing one runs it)."""
    names = []
    for path in sorted((ROOT / "tilead").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(names)


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports directly."""
    graph = grimp.build_graph(package, cache_dir=None)
    return {m: {n for n in graph.find_modules_directly_imported_by(m) if n in graph.modules} for m in graph.modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_tilead_has_no_import_cycle() -> None:
    graph = _import_graph("tilead")
    assert "tilead.trainer.config" in graph
    assert "tilead.trainer.detectors.sections" in graph
    assert "tilead.trainer.detectors.sections" in graph["tilead.trainer.config"]  # the graph does see imports
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: with one import added (sections -> config, config imports sections) it finds the cycle."""
    graph = _import_graph("tilead")
    graph["tilead.trainer.detectors.sections"].add("tilead.trainer.config")
    cycle = _cycle(graph)
    assert cycle is not None
    assert {"tilead.trainer.config", "tilead.trainer.detectors.sections"} <= set(cycle)


def test_config_and_detector_sections_load_without_torch() -> None:
    """The run config finds every family's section through the registry, and neither imports torch."""
    code = (
        "import sys\n"
        "from tilead.trainer.config import RunConfig\n"
        "from tilead.trainer.detectors.sections import model_sections\n"
        "print(sorted(model_sections()))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.endswith('.detector')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    families, heavy = out.stdout.strip().splitlines()
    assert families == "['padim', 'patchcore', 'stfpm']"
    assert heavy == "[]"


@pytest.mark.integration
@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order: str) -> None:
    names = _module_names()
    assert "tilead.trainer.evaluation" in names
    assert "tilead.runtime.predictor" in names
    if order == "reverse":
        names.reverse()
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        sys.exit(f'{name}: {type(err).__name__}: {err}')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
