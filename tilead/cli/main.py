"""``tilead``: one command with subcommands; the ``tilead-*`` scripts stay as aliases of them.

Subcommands are imported when used, so ``tilead --help`` and ``tilead predict``
load neither torch nor the trainer. Every subcommand spells its options alike:
``-o/--output`` for what it writes, ``--progress/--no-progress`` for bars
(default: only when stderr is a terminal), ``--set KEY=VALUE`` wherever a
config is read.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from tilead import __version__
from tilead.cli._common import CONTEXT

# name -> (module, one-line summary shown by `tilead --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tilead.cli.train", "Fit one detector per tile location from a YAML config."),
    "eval": ("tilead.cli.evaluate", "Evaluate a trained run: AUROC, F1, AUPRO, per-image results, overlays."),
    "export": ("tilead.cli.export", "A run to a verified ONNX bundle; TensorRT engines with --trt."),
    "predict": ("tilead.cli.predict", "Score image files and folders with a bundle: results.jsonl and overlays."),
    "bench": ("tilead.cli.bench", "Time a bundle's Predictor: latency, throughput, stages, memory."),
    "doctor": ("tilead.cli.doctor", "Capabilities of this machine and, on a GPU, the GPU self-checks."),
    "demo": ("tilead.cli.demo", "Synthetic data through train, export, predict and evaluation."),
    "info": ("tilead.cli.info", "Version, kernel build and CUDA status."),
    "calibrate": ("tilead.cli.calibrate", "Recompute a bundle's thresholds from images taken at the line."),
    "serve": ("tilead.cli.serve", "Serve a bundle over HTTP on Ray Serve, batching concurrent requests."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are the ``main`` of their modules, imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The built-in subcommands in workflow order, then any added ones."""
        return [*COMMANDS, *sorted(super().list_commands(ctx))]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import a built-in subcommand's module and return its command."""
        if cmd_name in COMMANDS:
            command = importlib.import_module(COMMANDS[cmd_name][0]).main
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the subcommands with their summaries, importing none."""
        rows = [(name, summary) for name, (_, summary) in COMMANDS.items()]
        rows += [(name, self.commands[name].get_short_help_str()) for name in sorted(self.commands)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="tilead")
def main(**_: Any) -> None:
    """Tiled-ensemble anomaly detection: train, export, predict.

    The old tilead-train, tilead-predict, ... commands are the same subcommands.
    """
