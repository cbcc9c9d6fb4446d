"""``tilead-doctor``: what this machine has, and on a GPU whether tilead's GPU path computes what the CPU does."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Also compare this bundle's TensorRT engines with ONNX Runtime on the CPU.",
)
@click.option("--build", is_flag=True, help="Build the bundle's engines for this GPU when missing (full TensorRT).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 when the GPU checks are skipped (for deployment boxes).")
@click.option(
    "--json",
    "json_path",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[PATH]",
    help="Write the report as one JSON object to PATH (atomically); --json alone prints it instead of text.",
)
def main(bundle: Path | None, build: bool, require_gpu: bool, json_path: str | None) -> None:
    """Print the installation's capabilities, run the GPU self-checks, and end with pass / fail / skipped.

    Exit status: 0 pass (or skipped without --require-gpu), 1 fail (or skipped with --require-gpu).
    """
    from tilead.atomic import atomic_write_bytes
    from tilead.selfcheck import as_dicts, gpu_checks, inventory, summary

    info = inventory()
    checks = gpu_checks(bundle, build=build)
    verdict = summary(checks)
    report = json.dumps({"inventory": info, "checks": as_dicts(checks), "result": verdict}, indent=2)
    if json_path not in (None, "-"):
        atomic_write_bytes(Path(str(json_path)), (report + "\n").encode())
    if json_path == "-":
        click.echo(report)
    else:
        for key, value in info.items():
            if key == "tensorrt":
                for name, entry in value.items():
                    text = (f"{entry['version']}" + "".join(
                        f"; missing {k.removeprefix('missing_').replace('_', ' ')}: {', '.join(v)}"
                        for k, v in entry.items() if k.startswith("missing_") and v)
                        if entry["installed"] else "not installed")  # fmt: skip
                    click.echo(f"{name:24s} {text}")
                continue
            shown = ", ".join(value) if isinstance(value, list) else value
            click.echo(f"{key:24s} {shown if shown not in ('', None) else '-'}")
        click.echo("")
        for c in checks:
            diff = "" if c.max_abs_diff is None else f"  max |diff| {c.max_abs_diff:.2e} (tolerance {c.tolerance:.0e})"
            click.echo(f"{c.status.upper():8s} {c.name}{diff}{'  ' + c.detail if c.detail else ''}")
        click.echo(
            f"\nresult: {verdict.upper()}"
            + ("  (no GPU here: the GPU checks did not run)" if verdict == "skipped" else "")
        )
    if verdict == "fail" or (verdict == "skipped" and require_gpu):
        raise SystemExit(1)
