"""Helpers shared by the click commands: overrides and error reporting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import yaml


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


@contextmanager
def fail_on_errors() -> Iterator[None]:
    """Turn expected errors (bad config, data or files) into a clean exit 2 message."""
    try:
        yield
    except (ValueError, FileNotFoundError, OSError) as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo("interrupted: finished locations are saved; rerun with --resume to continue", err=True)
        raise SystemExit(130) from None
