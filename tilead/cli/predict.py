"""``tilead predict``: run a bundle on image files; JSON lines and overlay PNGs.

Nothing is lost when something fails (issue #16):

* the output folder is created and checked writable before the first image;
* every result is one line of ``results.jsonl``, written in one ``write``,
  flushed and fsynced as soon as it is produced (one fsync per line), so a
  killed run keeps every line written before, each complete;
* a file that cannot be scored (unreadable, truncated, wrong size without
  ``--resize``) is recorded as a line with its ``error`` and the run goes on;
  so is an image whose model output held NaN or infinity (label NG, score
  1.0, ``raw_score`` null, ``error`` naming the locations);
* lines are strict JSON (no NaN / Infinity: non-finite numbers are null);
* the exit code is 0 when every image was scored cleanly, 3 when any line
  carries an error (1: the run could not start, 2: bad usage).

Folders are walked recursively; overlays mirror the input tree under
``OUTPUT/overlays`` (``good/000.png`` and ``scratch/000.png`` stay distinct).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from tilead.cli._common import CONTEXT, fail_on_errors, output_option, progress_option
from tilead.runtime.backends import names as backend_names

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESULTS = "results.jsonl"
EXIT_FILE_ERRORS = 3


def collect(inputs: tuple[Path, ...], exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """Image files of ``inputs`` (folders walked recursively, sorted), each with its overlay path.

    Args:
        inputs: Files and folders.
        exclude: A folder whose files are skipped (the output folder, when inside an input folder).

    Returns:
        ``(file, relative overlay path)`` pairs. Overlay paths mirror the files'
        paths relative to the inputs' common folder (``.png`` appended to other
        extensions), so no two files share one.

    Raises:
        click.UsageError: When no image is found.
    """
    skip = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = (p for p in item.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
            files.extend(sorted(p for p in found if skip is None or not p.resolve().is_relative_to(skip)))
        else:
            files.append(item)
    if not files:
        raise click.UsageError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(EXTENSIONS)})")
    roots = [str(i.resolve() if i.is_dir() else i.resolve().parent) for i in inputs]
    base = Path(os.path.commonpath(roots))
    out: list[tuple[Path, Path]] = []
    taken: set[Path] = set()
    for path in files:
        rel = path.resolve().relative_to(base)
        rel = rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png")
        candidate, k = rel, 1
        while candidate in taken:  # the same file named twice, or a.jpg next to a.jpg.png
            k += 1
            candidate = rel.with_name(f"{rel.stem}-{k}.png")
        taken.add(candidate)
        out.append((path, candidate))
    return out


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there.

    Raises:
        OSError: Naming the folder when it cannot be created or written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tilead-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output folder {folder} is not writable: {err.strerror or err}") from err


def finite_or_none(value: float, digits: int = 6) -> float | None:
    """A number for strict JSON: rounded, or None for NaN / infinity."""
    return round(value, digits) if math.isfinite(value) else None


class ResultsWriter:
    """``results.jsonl`` written line by line: one ``write`` per line, then flush and fsync.

    Args:
        path: The file (truncated when it exists).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self.lines = 0
        self.errors = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as strict JSON and make it durable before returning."""
        line = json.dumps(record, allow_nan=False) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.lines += 1
        self.errors += record.get("error") is not None

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cli_words(message: str) -> str:
    return message.replace("pass resize=True to resize", "pass --resize to resize them")


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@output_option("Output folder: results.jsonl and overlays/.", required=True, legacy=("--out",))
@click.option(
    "--resize",
    is_flag=True,
    help="Resize images of another size to the bundle's, as training does; maps and overlays come back at each "
    "image's own size.",
)
@click.option("--overlays/--no-overlays", default=True, show_default=True, help="Write overlay PNGs.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(list(backend_names())),
    default="auto",
    show_default=True,
    help="Predictor backend (openvino: CPU; tensorrt: the bundle's engines, --device cuda).",
)
@click.option("--batch", type=click.IntRange(1, 1024), default=1, show_default=True, help="Images per inference call.")
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="CPU threads for inference in all (default: all cores).",
)
@progress_option
def main(
    bundle: Path,
    images: tuple[Path, ...],
    output: Path,
    resize: bool,
    overlays: bool,
    device: str,
    backend: str,
    batch: int,
    threads: int | None,
    progress: bool,
) -> None:
    """Score IMAGES (files, or folders walked recursively) with BUNDLE; write OUTPUT/results.jsonl and overlays.

    Each result line is written and synced as soon as it is produced; a file that
    cannot be scored is recorded with its error and the run goes on. Exit code 0:
    every image scored cleanly; 3: some line carries an error; 1: the run could not start.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        files = collect(images, exclude=output)
        check_writable(output)
        if overlays:
            check_writable(output / "overlays")
        writer = ResultsWriter(output / RESULTS)
        try:
            _predict_all(bundle, files, output, writer, resize, overlays, device, backend, batch, threads, progress)
        finally:
            writer.close()
    failed = f", {writer.errors} with errors" if writer.errors else ""
    click.echo(f"results:    {writer.path} ({writer.lines} images{failed})")
    if writer.errors:
        raise SystemExit(EXIT_FILE_ERRORS)


def _predict_all(
    bundle: Path,
    files: list[tuple[Path, Path]],
    output: Path,
    writer: ResultsWriter,
    resize: bool,
    overlays: bool,
    device: str,
    backend: str,
    batch: int,
    threads: int | None,
    progress: bool,
) -> None:
    import numpy as np
    from tqdm import tqdm

    from tilead.atomic import atomic_write_png
    from tilead.imagefile import ImageFileError, read_image
    from tilead.runtime import Prediction, Predictor
    from tilead.runtime.preprocess import InputOrder
    from tilead.viz.overlays import overlay

    with Predictor(bundle, device=device, backend=backend, threads=threads, max_batch=batch) as predictor:
        gray = predictor.channels == 1
        order: InputOrder = "GRAY" if gray else "BGR"
        h, w = predictor.image_size
        bar = tqdm(total=len(files), unit="image", disable=not progress)

        def failed(path: Path, message: str) -> None:
            writer.write({"file": str(path), "score": None, "label": None, "raw_score": None, "error": message})
            click.echo(f"{path}: ERROR {message}", err=True)

        def decode(path: Path) -> np.ndarray | str:
            try:
                image = read_image(path, gray=gray)
            except ImageFileError as err:
                return str(err)
            if image.shape[:2] != (h, w) and not resize:
                return (
                    f"image size {image.shape[0]}x{image.shape[1]} (height x width) differs from the bundle's "
                    f"{h}x{w}; pass --resize to resize images"
                )
            return image

        def done(path: Path, rel: Path, image: np.ndarray, result: Prediction, ms: float) -> None:
            record = {
                "file": str(path),
                "score": finite_or_none(result.score),
                "label": result.label,
                "raw_score": finite_or_none(result.raw_score),
                "ms": round(ms, 1),
                "error": result.error,
            }
            if overlays:
                record["overlay"] = str(Path("overlays") / rel)
            verdict = "NG" if result.label else "OK"
            if overlays:  # the overlay first: a line in results.jsonl means its overlay exists
                # At the file's full resolution: the overlay upsamples the map and mask to the image.
                pic = overlay(image, result.anomaly_map, result.mask, None, rel.as_posix(), score=result.score,
                              label=result.label, extra=f"raw {result.raw_score:.4g}")  # fmt: skip
                atomic_write_png(output / "overlays" / rel, pic)
            writer.write(record)
            note = f"  ERROR {result.error}" if result.error else ""
            click.echo(f"{path}: score {result.score:.3f} {verdict} ({ms:.0f} ms){note}")

        for chunk in _batches(files, batch):
            decoded = [(path, rel, decode(path)) for path, rel in chunk]
            ready = [(p, r, img) for p, r, img in decoded if not isinstance(img, str)]
            for p, _, img in decoded:
                if isinstance(img, str):
                    failed(p, img)
            if ready:
                try:
                    start = time.perf_counter()
                    results = predictor.predict([img for _, _, img in ready], input_order=order, resize=resize)
                    ms = (time.perf_counter() - start) * 1e3 / len(ready)
                except ValueError:  # one bad image spoils a batch: score them one by one to name it
                    results = None
                if isinstance(results, list):
                    for (p, r, img), res in zip(ready, results, strict=True):
                        done(p, r, img, res, ms)
                else:
                    for p, r, img in ready:
                        try:
                            start = time.perf_counter()
                            one = predictor.predict(img, input_order=order, resize=resize)
                            ms = (time.perf_counter() - start) * 1e3
                        except ValueError as err:
                            failed(p, _cli_words(str(err)))
                            continue
                        assert not isinstance(one, list)
                        done(p, r, img, one, ms)
            bar.update(len(chunk))
        bar.close()


if __name__ == "__main__":
    main()
