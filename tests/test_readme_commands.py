"""Every command the README shows exists as written (issue #19 item 5): subcommands, options, make targets.

The README's ``tilead ...`` lines must name real subcommands and real options of them, its ``make``
lines real Makefile targets; its ``python -c`` lines run; its Python block compiles and its imports work.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tilead.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def shell_lines() -> list[list[str]]:
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_the_readme_has_shell_commands_to_check() -> None:
    firsts = {words[0] for words in shell_lines()}
    assert {"make", "tilead"} <= firsts


@pytest.mark.parametrize("words", [w for w in shell_lines() if w[0] == "tilead"], ids=" ".join)
def test_tilead_commands_use_real_subcommands_and_options(words: list[str]) -> None:
    name = words[1]
    assert name in COMMANDS, f"tilead {name}: no such subcommand (have {sorted(COMMANDS)})"
    command = main.get_command(click.Context(main), name)
    assert command is not None
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in words[2:]:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            assert option in known, f"tilead {name}: unknown option {option} (known: {sorted(known)})"


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.MULTILINE))
    used = {words[1] for words in shell_lines() if words[0] == "make"}
    assert used, "no make commands found"
    assert used <= targets, f"README uses make targets the Makefile lacks: {sorted(used - targets)}"


def test_python_one_liners_run() -> None:
    one_liners = [w for w in shell_lines() if w[0].endswith("python") and w[1] == "-c"]
    assert one_liners
    for words in one_liners:
        proc = subprocess.run([sys.executable, "-c", words[2]], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), f"{words[2]!r} printed nothing"
    assert (
        "4 x 5 = 20 locations"
        in subprocess.run(
            [sys.executable, "-c", one_liners[0][2]], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )  # the grid example's count, as the README states it


def test_python_block_compiles_and_its_imports_work() -> None:
    (code,) = blocks("python")
    compile(code, "README.md", "exec")
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
    assert imports
    exec(compile(imports, "README.md", "exec"), {})


def test_grid_example_is_a_valid_config_and_has_the_stated_locations(tmp_path: Path) -> None:
    import yaml

    from tilead.trainer.config import parse_config

    (example,) = blocks("yaml")
    data = yaml.safe_load(example)
    data["data"].update({"format": "folder", "root": str(tmp_path)})
    cfg = parse_config(data, base_dir=tmp_path, source="README.md")
    assert cfg.data.output_size is not None
    grid = cfg.grid.build(cfg.data.output_size)  # what training builds
    assert (grid.rows, grid.cols) == (4, 5)  # "4x5 = 20 locations" in the README
