"""What ``tilead-bench`` times: the runtime Predictor, and for ``--compare`` a second route.

A target runs one batch and says where the time went (:class:`StageTimes`).
Stage names are shared by every target so the report can put them side by
side: ``input``, ``tile``, ``h2d``, ``inference`` (with ``location:<name>``
per location), ``untile``, ``seam``, ``crop``, ``normalize``, ``d2h``.
A target reports only the stages it has (the ONNX Runtime routes have no
separate host-to-device copy: on CPU there is none, with the CUDA provider it
happens inside the session's run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tilead.runtime import Manifest, Predictor
from tilead.runtime.preprocess import InputOrder
from tilead.runtime.timing import StageTimes


class Target(Protocol):
    """A route through the ensemble that can be timed batch by batch."""

    name: str
    """Label in the report, e.g. ``tilead onnxruntime``."""

    info: dict[str, Any]
    """Backend, device, threads, providers: what the JSON records about this route."""

    load_s: float
    """Seconds loading the route took."""

    def run(self, batch: np.ndarray) -> StageTimes:
        """Score one batch.

        Args:
            batch: uint8 ``(n, H, W, C)`` in BGR order (or ``C == 1`` gray).

        Returns:
            Seconds per stage for this call.
        """
        ...

    def close(self) -> None:
        """Release the route's resources."""
        ...


@dataclass
class LoadedRoute:
    """What every route records about itself.

    Attributes:
        name: Report label.
        load_s: Seconds the load took.
        info: Route facts for the JSON.
    """

    name: str
    load_s: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictorTarget(LoadedRoute):
    """:class:`tilead.runtime.Predictor` on a bundle (``load_s``: manifest, hashes, sessions)."""

    predictor: Predictor | None = None
    stages: bool = True
    """Time each stage (``predict_timed``); False: plain ``predict``, whole-call latency only (a TensorRT call
    without a graph then synchronizes once, as in production, instead of after every stage)."""

    def run(self, batch: np.ndarray) -> StageTimes:
        """``Predictor.predict_timed`` on the batch (``predict`` and no stages when ``stages`` is False)."""
        if self.predictor is None:
            raise RuntimeError(f"{self.name}: closed")
        order: InputOrder = "GRAY" if batch.shape[3] == 1 else "BGR"
        if not self.stages:
            self.predictor.predict(batch, input_order=order)
            return StageTimes()
        _, times = self.predictor.predict_timed(batch, input_order=order)
        return times

    def close(self) -> None:
        """Close the Predictor."""
        if self.predictor is not None:
            self.predictor.close()


def load_predictor(
    bundle: Path,
    *,
    backend: str,
    device: str,
    threads: int | None,
    location_workers: int | None,
    max_batch: int,
    cuda_graphs: bool = True,
    stages: bool = True,
    label: str = "",
) -> PredictorTarget:
    """Load a bundle into a :class:`PredictorTarget` and time the load.

    ``cuda_graphs`` goes to the Predictor (the TensorRT backend uses it), ``stages`` to the target, ``label``
    after the route's name (``tilead tensorrt (no CUDA graphs)``).

    Raises:
        BundleError, ValueError, RuntimeError: As :class:`~tilead.runtime.Predictor` does.
    """
    import time

    start = time.perf_counter()
    predictor = Predictor(
        bundle,
        device=device,
        backend=backend,  # validated by Predictor with a clear message
        threads=threads,
        location_workers=location_workers,
        max_batch=max_batch,
        cuda_graphs=cuda_graphs,
    )
    load_s = time.perf_counter() - start
    info = {
        "backend": predictor.backend,
        "device": device,
        "threads": predictor.threads,
        "location_workers": predictor.location_workers,
        "providers": predictor.providers,
        "max_batch": max_batch,
        "device_memory_mib": None if predictor.device_memory_bytes is None else predictor.device_memory_bytes / 2**20,
    }
    if predictor.backend == "tensorrt":
        info["cuda_graphs"] = "on" if cuda_graphs else "off"
    name = f"tilead {info['backend']}" + (f" ({label})" if label else "")
    return PredictorTarget(name, load_s, info, predictor, stages)


@dataclass
class TorchTarget(LoadedRoute):
    """The trainer's eager PyTorch ensemble (:class:`tilead.trainer.eager.EagerEnsemble`).

    It runs the runtime's tile kernel, each location's PyTorch model under
    ``torch.inference_mode`` and the runtime's post-processing: what
    ``tilead-eval`` runs without a bundle. ``load_s`` includes importing torch.
    """

    ensemble: Any = None

    def run(self, batch: np.ndarray) -> StageTimes:
        """``EagerEnsemble.predict`` on the batch (converted to the run's channel order)."""
        import torch

        if self.ensemble is None:
            raise RuntimeError(f"{self.name}: closed")
        images = batch
        if batch.shape[3] == 3 and self.ensemble.cfg.data.channel_order == "RGB":
            images = np.ascontiguousarray(batch[..., ::-1])
        timer = StageTimes()
        with torch.inference_mode():
            self.ensemble.predict(images, timer)
        return timer

    def close(self) -> None:
        """Drop the models."""
        self.ensemble = None


def load_torch(run: Path, *, threads: int | None, manifest: Manifest | None) -> TorchTarget:
    """Load a run folder's eager ensemble for ``--compare torch``.

    Args:
        run: The run the bundle was exported from.
        threads: Torch intra-op threads (default: every usable core).
        manifest: The bundle's manifest; a run it was not exported from (as the run is now,
            :meth:`tilead.trainer.run.Run.matches`) is a different ensemble and is refused.

    Raises:
        RuntimeError: If PyTorch (the trainer extra) is not installed.
        FileNotFoundError, ValueError: For a missing, unfinished or different run.
    """
    import time

    start = time.perf_counter()
    try:
        import torch

        from tilead.trainer.eager import load_eager_ensemble
        from tilead.trainer.run import Run
    except ImportError as err:
        raise RuntimeError(
            f"--compare torch needs the trainer's PyTorch stack ({err}); install it with pip install 'tilead[train]'"
        ) from err
    from tilead.benchmarking.environment import usable_cores

    opened = Run.open(run)
    differences = [] if manifest is None else opened.mismatches(manifest)
    if differences:
        raise ValueError(
            f"--run {run}: the bundle was not exported from this run as it is now ({'; '.join(differences)}); "
            "pass the run the bundle was exported from"
        )
    torch.set_num_threads(threads or usable_cores())
    ensemble = load_eager_ensemble(opened)
    load_s = time.perf_counter() - start
    info = {
        "backend": "torch-eager",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "run": str(run),
    }
    return TorchTarget("torch eager", load_s, info, ensemble)
