"""``tilead-predict``: run a bundle on image files; JSON lines and overlay PNGs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from tilead.cli._common import fail_on_errors

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _collect(inputs: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()))
        else:
            files.append(item)
    if not files:
        raise click.UsageError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(EXTENSIONS)})")
    return files


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--resize", is_flag=True, help="Resize images of another size to the bundle's.")
@click.option("--overlays/--no-overlays", default=True, show_default=True, help="Write overlay PNGs.")
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="CPU threads for inference in all (default: all cores).",
)
def main(
    bundle: Path, images: tuple[Path, ...], out_dir: Path, resize: bool, overlays: bool, threads: int | None
) -> None:
    """Score IMAGES (files or folders) with BUNDLE; write results.jsonl and overlays to --out."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        import cv2
        import numpy as np

        from tilead.atomic import atomic_write_png, atomic_write_text
        from tilead.runtime import Predictor
        from tilead.trainer.overlays import overlay

        files = _collect(images)
        lines = []
        with Predictor(bundle, threads=threads) as predictor:
            gray = predictor.channels == 1
            for path in files:
                data = np.fromfile(path, dtype=np.uint8)
                image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR) if data.size else None
                if image is None:
                    raise ValueError(f"cannot read image {path} (corrupt or unsupported format)")
                start = time.perf_counter()
                result = predictor.predict(image, input_order="GRAY" if gray else "BGR", resize=resize)
                ms = (time.perf_counter() - start) * 1e3
                assert not isinstance(result, list)
                record = {"file": str(path), "score": round(result.score, 6), "label": result.label,
                          "raw_score": round(result.raw_score, 6), "ms": round(ms, 1)}  # fmt: skip
                lines.append(json.dumps(record))
                click.echo(f"{path}: score {result.score:.3f} {'NG' if result.label else 'OK'} ({ms:.0f} ms)")
                if overlays:
                    shown = image if image.shape[:2] == result.anomaly_map.shape else cv2.resize(
                        image, result.anomaly_map.shape[::-1], interpolation=cv2.INTER_AREA
                    )  # fmt: skip
                    caption = f"{path.name} score {result.score:.2f} {'NG' if result.label else 'OK'}"
                    pic = overlay(shown, result.anomaly_map, result.mask, None, caption)
                    atomic_write_png(out_dir / "overlays" / f"{path.stem}.png", pic)
        atomic_write_text(out_dir / "results.jsonl", "\n".join(lines) + "\n")
        click.echo(f"results:    {out_dir / 'results.jsonl'} ({len(lines)} images)")
