"""The demo run: synthetic data through the product pipeline, end to end.

Every step is the code a user runs on real data:

1. :func:`tilead.demo.synthetic.generate` writes the deterministic synthetic
   dataset (MVTec AD layout) to ``OUT/data`` (reused when its spec matches);
2. :func:`tilead.trainer.pipeline.train` fits the PaDiM tiled ensemble of
   ``configs/padim_demo.yaml`` (``data.root`` pointed at the generated data)
   into ``OUT/run``, holding out good training images for the thresholds;
3. :func:`tilead.exporter.bundle.export_bundle` exports it to ``OUT/bundle``
   (ONNX per location, checked against the eager models, hashed, atomic);
4. :class:`tilead.runtime.Predictor` (the torch-free runtime) scores every
   test image one at a time: ``OUT/predictions.jsonl`` and overlay PNGs in
   ``OUT/overlays``;
5. :func:`tilead.trainer.evaluation.evaluate` evaluates the bundle on the test
   set: ``OUT/eval/metrics.json`` (image / pixel AUROC, AUPRO, F1) and
   ``OUT/eval/per_image.csv``.

Re-running is cheap and safe. ``OUT/run/demo.json`` records the dataset spec
and the config the run was trained with: when both match and training
finished, the run is reused; when data and fit key match but training did
not finish (or only settings outside the fit key changed), training resumes;
when the data or the model changed, the demo's own run folder is replaced. The bundle is reused when it was
exported from the unchanged run (fit key and statistics match and its files
verify), else exported again (atomically replacing the old one).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tilead.demo.synthetic import SyntheticSpec, generate
from tilead.trainer.config import RunConfig, load_config

log = logging.getLogger("tilead.demo")

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "padim_demo.yaml"
"""The shipped demo config (in the source tree's ``configs/``)."""

DEFAULT_IMAGE_SIZE = SyntheticSpec().image_size
"""The image size the shipped config's grid is laid out for."""

RECORD = "demo.json"
"""File in the run folder recording the data spec and config it was trained with."""

TrainStep = Literal["trained", "resumed", "reused"]
ExportStep = Literal["exported", "reused"]


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes, under one output folder.

    Attributes:
        root: The output folder.
    """

    root: Path

    @property
    def data(self) -> Path:
        """The synthetic dataset, ``data/``."""
        return self.root / "data"

    @property
    def run(self) -> Path:
        """The training run folder, ``run/``."""
        return self.root / "run"

    @property
    def bundle(self) -> Path:
        """The exported bundle, ``bundle/``."""
        return self.root / "bundle"

    @property
    def predictions(self) -> Path:
        """One JSON line per test image, ``predictions.jsonl``."""
        return self.root / "predictions.jsonl"

    @property
    def overlays(self) -> Path:
        """Overlay PNGs of the Predictor's outputs, ``overlays/``."""
        return self.root / "overlays"

    @property
    def eval(self) -> Path:
        """The evaluation through the bundle, ``eval/``."""
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        """``eval/metrics.json``."""
        return self.eval / "metrics.json"


@dataclass(frozen=True)
class DemoResult:
    """What the demo did, measured and wrote.

    Attributes:
        paths: The output layout.
        metrics: Evaluation metrics through the bundle (``image_auroc``,
            ``pixel_auroc``, ``aupro``, ``image_f1``, ``pixel_f1``, ...).
        report: The full evaluation report (``eval/metrics.json``).
        predictions: Number of test images scored by the Predictor.
        predict_ms: Mean Predictor latency per image in milliseconds (one image
            per call, after a warm-up call; decoding excluded).
        overlays: The overlay PNGs written.
        train_step: ``trained``, ``resumed`` or ``reused``.
        export_step: ``exported`` or ``reused``.
        timings: Seconds per step (``data``, ``train``, ``export``, ``predict``, ``evaluate``).
        seconds: Total wall time of :func:`run`.
    """

    paths: DemoPaths
    metrics: dict[str, float]
    report: dict[str, Any]
    predictions: int
    predict_ms: float
    overlays: list[Path] = field(default_factory=list)
    train_step: TrainStep = "trained"
    export_step: ExportStep = "exported"
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def demo_grid(image_size: int) -> tuple[int, int]:
    """A 2x2 grid with overlapping tiles for square images of ``image_size``.

    The overlap is about 1/16 of the image (at least 16 px); the tile is
    rounded up to a multiple of 16 (the backbone's deepest stride).

    Args:
        image_size: Image height and width in pixels.

    Returns:
        ``(tile_size, stride)``: origins ``0`` and ``stride``, the second tile
        ending at the image border.
    """
    overlap = max(16, image_size // 16)
    tile = -(-(image_size + overlap) // 32) * 16
    return tile, image_size - tile


def load_demo_config(
    config: Path, data_root: Path, image_size: int, user_overrides: dict[str, Any] | None = None
) -> RunConfig:
    """The demo's run config: ``config`` with ``data.root`` set to the generated data.

    For an image size other than :data:`DEFAULT_IMAGE_SIZE` the grid is
    replaced by :func:`demo_grid` (the shipped grid is laid out for the default).

    Args:
        config: The YAML config file.
        data_root: The generated dataset.
        image_size: The dataset's image size.
        user_overrides: Dotted config keys to replace first (``tilead demo --set``); the
            demo's own ``data.root`` (and grid for other sizes) still win.

    Returns:
        The validated run config.

    Raises:
        ConfigError: If the file is missing or invalid.
    """
    overrides: dict[str, Any] = {**(user_overrides or {}), "data.root": str(data_root.resolve())}
    if image_size != DEFAULT_IMAGE_SIZE:
        tile, stride = demo_grid(image_size)
        overrides.update({"grid.tile_size": tile, "grid.stride": stride})
    return load_config(config, overrides)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 2)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_run_folder(run_dir: Path) -> None:
    """Refuse to touch a non-empty ``run/`` the demo did not create.

    Raises:
        FileExistsError: If ``run_dir`` holds files but no demo record.
    """
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RECORD).is_file():
        raise FileExistsError(
            f"{run_dir} exists but was not written by tilead-demo (no {RECORD}); "
            "choose another -o/--output or remove that folder"
        )


def _train(cfg: RunConfig, run_dir: Path, data_spec: Any, progress: bool) -> TrainStep:
    """Train into ``run_dir``, resuming or reusing what a previous demo left there."""
    from tilead.trainer.io import atomic_write_json
    from tilead.trainer.pipeline import train
    from tilead.trainer.run import Run
    from tilead.trainer.run_dir import RunPaths

    paths = RunPaths(run_dir)
    wanted = {"data_spec": data_spec, "config": cfg.to_dict()}
    if (run_dir / RECORD).is_file():
        record = _read_json(run_dir / RECORD)
        record = record if isinstance(record, dict) else {}
        try:
            old: Run | None = Run.open(run_dir)
        except (OSError, ValueError):  # not started, or unreadable: nothing to keep
            old = None
        same_fit = old is not None and record.get("data_spec") == data_spec and old.fit_key == cfg.fit_key()
        if old is not None and same_fit and record == wanted and old.finished:
            log.info("demo: reusing the finished run in %s", run_dir)
            return "reused"
        if not same_fit:
            log.info("demo: the data or the model changed; replacing %s", run_dir)
            shutil.rmtree(run_dir)
    step: TrainStep = "resumed" if paths.config.is_file() else "trained"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RECORD, wanted)
    # resume=True: continue an interrupted demo run (prepare_run checks the fit key), or start afresh.
    train(cfg, run_dir, resume=True, progress=progress)
    return step


def _bundle_matches(bundle: Path, run_dir: Path) -> bool:
    """Whether ``bundle`` is intact and was exported from the finished run in ``run_dir`` as it is now."""
    from tilead import __version__
    from tilead.runtime import BundleError, read_manifest, verify_files
    from tilead.trainer.run import Run

    try:
        manifest = read_manifest(bundle, current_version=__version__)
        verify_files(bundle, manifest)
        return Run.open(run_dir).matches(manifest)
    except (BundleError, OSError, ValueError):
        return False


def _export(run_dir: Path, bundle: Path, run_reused: bool, progress: bool) -> ExportStep:
    """Export the run to ``bundle`` unless an identical export is already there.

    Raises:
        FileExistsError: If ``bundle`` exists and is not a tilead bundle.
    """
    from tilead.exporter.bundle import export_bundle
    from tilead.runtime.bundle import MANIFEST

    if run_reused and _bundle_matches(bundle, run_dir):
        log.info("demo: reusing the bundle in %s", bundle)
        return "reused"
    if bundle.exists() and not (bundle / MANIFEST).is_file():
        raise FileExistsError(f"{bundle} exists and is not a tilead bundle; choose another -o/--output or remove it")
    export_bundle(run_dir, bundle, overwrite=True, progress=progress)
    return "exported"


def _predict(
    bundle: Path,
    cfg: RunConfig,
    paths: DemoPaths,
    overlays: int,
    progress: bool,
) -> tuple[int, float, list[Path]]:
    """Score every test image with the runtime Predictor; write predictions and overlays.

    Returns:
        ``(images, mean ms per image, overlay files)``.

    Raises:
        OSError: If an image or mask cannot be read.
    """
    import cv2
    from tqdm.auto import tqdm

    from tilead.runtime import Predictor
    from tilead.trainer.data import MASK_THRESHOLD, discover
    from tilead.trainer.io import atomic_write_png, atomic_write_text
    from tilead.viz.overlays import overlay, pick_overlays

    samples = list(discover(cfg.data).test)
    drawn = set(pick_overlays([s.defect_type for s in samples], overlays))
    lines: list[str] = []
    written: list[Path] = []
    total_s = 0.0
    with Predictor(bundle) as predictor:
        predictor.warmup()
        for i, sample in enumerate(tqdm(samples, desc="predict (runtime)", unit="img", disable=not progress)):
            image = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
            if image is None:
                raise OSError(f"cannot read image {sample.path}")
            start = time.perf_counter()
            result = predictor.predict(image, input_order="BGR")
            ms = (time.perf_counter() - start) * 1e3
            total_s += ms / 1e3
            assert not isinstance(result, list)
            record = {
                "file": str(sample.path),
                "defect_type": sample.defect_type,
                "score": round(result.score, 6),
                "label": result.label,
                "raw_score": round(result.raw_score, 6),
                "ms": round(ms, 1),
            }
            lines.append(json.dumps(record))
            if i in drawn:
                truth = None
                if sample.mask_path is not None:
                    mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
                    if mask is None:
                        raise OSError(f"cannot read mask {sample.mask_path}")
                    truth = mask > MASK_THRESHOLD
                caption = f"{sample.defect_type}/{sample.path.name}"
                pic = overlay(image, result.anomaly_map, result.mask, truth, caption, score=result.score,
                              label=result.label, extra=f"raw {result.raw_score:.4g}")  # fmt: skip
                target = paths.overlays / f"{sample.defect_type}_{sample.path.stem}.png"
                atomic_write_png(target, pic)
                written.append(target)
    for stale in paths.overlays.glob("*.png"):
        if stale not in written:
            stale.unlink()
    atomic_write_text(paths.predictions, "\n".join(lines) + "\n")
    return len(samples), 1e3 * total_s / max(1, len(samples)), written


def run(
    out_dir: str | Path,
    spec: SyntheticSpec | None = None,
    *,
    config: Path | None = None,
    overlays: int = 8,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the whole demo (see the module docstring).

    Args:
        out_dir: Output folder (``data/``, ``run/``, ``bundle/``, ``predictions.jsonl``,
            ``overlays/``, ``eval/``).
        spec: Synthetic dataset settings (default :class:`SyntheticSpec`).
        config: Run config (default :data:`DEFAULT_CONFIG`).
        overlays: Test images to draw, spread over good and the defect types.
        progress: Show progress bars.
        echo: Called with a one-line note as each step starts (e.g. ``click.echo``).
        overrides: Dotted config keys to replace (``tilead demo --set``).

    Returns:
        What was done, measured and written.

    Raises:
        ConfigError: For a missing or invalid config.
        FileExistsError: If ``OUT/run`` or ``OUT/bundle`` hold something the demo did not write.
        ValueError: For data, training or export problems (with their messages).
    """
    start = time.perf_counter()
    spec = spec if spec is not None else SyntheticSpec()
    paths = DemoPaths(Path(out_dir))
    note = echo if echo is not None else (lambda _msg: None)
    cfg = load_demo_config(config if config is not None else DEFAULT_CONFIG, paths.data, spec.image_size, overrides)
    _check_run_folder(paths.run)
    timings: dict[str, float] = {}

    note(f"[1/5] synthetic data -> {paths.data}")
    with _timed(timings, "data"):
        generate(paths.data, spec)
    data_spec = _read_json(paths.data / "spec.json")

    note(f"[2/5] train PaDiM tiled ensemble ({cfg.name}) -> {paths.run}")
    with _timed(timings, "train"):
        train_step = _train(cfg, paths.run, data_spec, progress)

    note(f"[3/5] export bundle -> {paths.bundle}")
    with _timed(timings, "export"):
        export_step = _export(paths.run, paths.bundle, train_step == "reused", progress)

    note(f"[4/5] predict test images with runtime.Predictor -> {paths.predictions}")
    with _timed(timings, "predict"):
        count, ms, written = _predict(paths.bundle, cfg, paths, overlays, progress)

    note(f"[5/5] evaluate the bundle -> {paths.eval}")
    with _timed(timings, "evaluate"):
        from tilead.trainer.evaluation import evaluate

        evaluation = evaluate(paths.run, paths.eval, bundle=paths.bundle, progress=progress)

    report = evaluation.metrics
    return DemoResult(
        paths=paths,
        metrics={k: float(v) for k, v in report["metrics"].items()},
        report=report,
        predictions=count,
        predict_ms=ms,
        overlays=written,
        train_step=train_step,
        export_step=export_step,
        timings=timings,
        seconds=time.perf_counter() - start,
    )


def summary_lines(result: DemoResult) -> list[str]:
    """The human summary the CLI prints.

    Args:
        result: What :func:`run` returned.

    Returns:
        One string per line.
    """
    p, m, t = result.paths, result.metrics, result.timings
    tile = result.report.get("grid", {}).get("tile_size", ["?", "?"])
    shape = result.report.get("grid_shape", ["?", "?"])
    split = result.report.get("validation", {}).get("split", "?")
    return [
        f"data:          {p.data}",
        f"run:           {p.run} ({result.train_step}; PaDiM {shape[0]}x{shape[1]} tiles of "
        f"{tile[0]}x{tile[1]} px, thresholds from the {split} split)",
        f"bundle:        {p.bundle} ({result.export_step})",
        f"predictions:   {p.predictions} ({result.predictions} images)",
        f"overlays:      {p.overlays} ({len(result.overlays)} images)",
        f"metrics:       {p.metrics}",
        f"image AUROC:   {m['image_auroc']:.4f}   pixel AUROC: {m['pixel_auroc']:.4f}   AUPRO: {m['aupro']:.4f}",
        f"image F1:      {m['image_f1']:.4f}   pixel F1: {m['pixel_f1']:.4f}   (deployed thresholds)",
        f"runtime:       {result.predict_ms:.0f} ms per image (runtime.Predictor, ONNX Runtime CPU, 1 image per call)",
        "time:          " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f"; total {result.seconds:.1f} s",
    ]
