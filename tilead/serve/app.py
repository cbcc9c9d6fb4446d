"""The served Predictor: a Ray Serve deployment with dynamic batching.

Routes (FastAPI, behind Ray Serve's HTTP proxy):

* ``POST /predict`` (body: an encoded image, PNG/JPEG/BMP/TIFF; ``?mask=1`` adds
  the mask as a base64 PNG): ``{"score", "label", "raw_score", "timings",
  ["mask_png", "mask_shape"]}``. Concurrent requests to a replica are gathered
  by ``@serve.batch`` into one :meth:`Predictor.predict` call of up to
  ``max_batch`` images (waiting at most ``batch_wait_ms`` for a batch to fill).
* ``GET /healthz``: the replica's process answers (200).
* ``GET /readyz``: the replica holds a loaded, warmed Predictor (200, with the
  bundle's facts) or not (503).

Bad requests (not an image, wrong size when the server does not resize, a body
over the limit, a bad query parameter) are answered 4xx with a reason before
they reach a batch, so they never fail other requests nor the replica. Images
are decoded with OpenCV (:mod:`tilead.serve.codec`). Nothing here imports torch
or the trainer: the runtime install plus ``ray[serve]`` serves a bundle.

No ``from __future__ import annotations`` here: FastAPI reads the route
methods' annotations at run time (``Request``), after Ray Serve rebuilt them.
"""

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from tilead.serve.codec import ImageSpec, RequestError, check_length, decode_image, parse_flag, result_json

api = FastAPI(title="tilead", description="Tiled-ensemble anomaly detection: one bundle served by runtime.Predictor")


@dataclass(frozen=True)
class ServeOptions:
    """How a bundle is served.

    Attributes:
        bundle: Bundle directory (must be readable from every replica's node).
        replicas: Replicas (each its own process and Predictor).
        max_batch: Images per Predictor call (dynamic batching).
        batch_wait_ms: Longest wait for a batch to fill after its first request.
        device: ``cpu`` or ``cuda`` (``cuda``: one GPU per replica).
        threads: CPU threads per replica's Predictor (and the CPUs Ray reserves for it).
        resize: Resize images of another size instead of refusing them (422).
        max_body_bytes: Largest accepted request body (413 above it).
        backend: The Predictor's backend (``auto`` or a name of :mod:`tilead.runtime.backends`).
    """

    bundle: str
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    device: str = "cpu"
    threads: int = 1
    resize: bool = False
    max_body_bytes: int = 32 << 20
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch", "threads", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms: expected >= 0, got {self.batch_wait_ms!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")

    def actor_options(self) -> dict[str, Any]:
        """Ray resources of one replica: its CPU threads, plus one GPU on ``cuda``."""
        opts: dict[str, Any] = {"num_cpus": self.threads}
        if self.device == "cuda":
            opts["num_gpus"] = 1
        return opts


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.reason, "status": err.status}, status_code=err.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it exceeds ``limit`` (whatever the headers said).

    Raises:
        RequestError: 413 over the limit.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="tilead", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class InspectionServer:
    """One replica: a Predictor on the bundle, fed by dynamic batches."""

    def __init__(self, options: dict[str, Any]) -> None:
        from tilead.runtime import Predictor

        self.config = ServeOptions(**options)
        o = self.config
        self.predictor: Predictor | None = Predictor(
            o.bundle,
            device=o.device,
            backend=o.backend,
            threads=o.threads,
            max_batch=o.max_batch,
        )
        self.spec = ImageSpec(
            image_size=self.predictor.image_size,
            channels=self.predictor.channels,
            resize=o.resize,
            max_body_bytes=o.max_body_bytes,
        )
        batched: Any = self._predict_batch  # serve.batch's wrapper: its settings are changeable per replica
        batched.set_max_batch_size(o.max_batch)
        batched.set_batch_wait_timeout_s(o.batch_wait_ms / 1000.0)
        self.predictor.warmup()
        self.batches = 0

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a closed Predictor restarts the replica.

        Raises:
            RuntimeError: When the Predictor is gone.
        """
        if self.predictor is None:
            raise RuntimeError("the replica's Predictor is closed")

    def __del__(self) -> None:
        predictor, self.predictor = getattr(self, "predictor", None), None
        if predictor is not None:
            predictor.close()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[tuple[np.ndarray, float]]) -> list[tuple[Any, dict[str, float], int]]:
        """Run one batch of decoded images through the Predictor (in a thread: the event loop keeps accepting).

        Args:
            items: ``(image, enqueue time)`` pairs; images uint8 ``(H, W, C)``.

        Returns:
            ``(prediction, timings, batch size)`` per item, in order.
        """
        predictor = self.predictor
        if predictor is None:
            raise RuntimeError("the replica's Predictor is closed")
        start = time.perf_counter()
        images = [image for image, _ in items]
        order = self.spec.input_order
        results = await asyncio.to_thread(
            predictor.predict,
            images,
            input_order=order,  # type: ignore[arg-type]
            resize=self.spec.resize,
        )
        predict_ms = (time.perf_counter() - start) * 1e3
        self.batches += 1
        assert isinstance(results, list)
        return [
            (r, {"queue_ms": (start - queued) * 1e3, "predict_ms": predict_ms}, len(items))
            for r, (_, queued) in zip(results, items, strict=True)
        ]

    @api.post("/predict", response_model=None)
    async def predict(self, request: Request) -> JSONResponse:
        """Score one encoded image (see the module docstring for the answer)."""
        start = time.perf_counter()
        try:
            with_mask = parse_flag(request.query_params.get("mask"), "mask")
            check_length(request.headers.get("content-length"), self.spec)
            body = await _read_body(request, self.spec.max_body_bytes)
            image = await asyncio.to_thread(decode_image, body, self.spec)  # OpenCV releases the GIL
        except RequestError as err:
            return _error(err)
        decoded = time.perf_counter()
        try:
            prediction, timings, batch_size = await self._predict_batch((image, decoded))
        except Exception as err:  # the Predictor failed on this batch: say so; the replica keeps serving
            reason = f"prediction failed: {type(err).__name__}: {err}"
            return JSONResponse({"error": reason, "status": 500}, status_code=500)
        timings = {"decode_ms": (decoded - start) * 1e3, **timings, "total_ms": (time.perf_counter() - start) * 1e3}
        mask = prediction.mask if with_mask else None
        body_json = result_json(prediction.score, prediction.label, prediction.raw_score, timings, mask)
        body_json["batch_size"] = batch_size
        return JSONResponse(body_json)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica's process answers."""
        return {"status": "ok"}

    @api.get("/readyz", response_model=None)
    async def readyz(self) -> JSONResponse:
        """Readiness: a loaded, warmed Predictor (200) or none (503)."""
        predictor = self.predictor
        if predictor is None:
            return JSONResponse({"ready": False, "reason": "the Predictor is closed"}, status_code=503)
        h, w = predictor.image_size
        return JSONResponse(
            {
                "ready": True,
                "bundle": str(Path(self.config.bundle)),
                "image_size": [h, w],
                "channels": predictor.channels,
                "providers": predictor.providers,
                "max_batch": self.config.max_batch,
                "batch_wait_ms": self.config.batch_wait_ms,
                "resize": self.config.resize,
                "batches_run": self.batches,
                "pid": os.getpid(),
            }
        )


def build_app(options: ServeOptions) -> serve.Application:
    """The Ray Serve application for ``options`` (bind it with :func:`ray.serve.run`).

    Raises:
        ValueError: For a bundle folder that does not exist.
    """
    if not Path(options.bundle).is_dir():
        raise ValueError(f"bundle: {options.bundle} is not a directory (expected a tilead-export bundle)")
    server: Any = InspectionServer  # a serve.Deployment at run time (the decorator's typing says the class)
    deployment = server.options(
        num_replicas=options.replicas,
        ray_actor_options=options.actor_options(),
        max_ongoing_requests=max(64, 4 * options.max_batch),
    )
    app: serve.Application = deployment.bind(asdict(options))
    return app


@contextmanager
def serving(
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
    name: str = "tilead",
    route_prefix: str = "/",
    exclusive: bool | None = None,
) -> Iterator[str]:
    """Start Ray (or join ``address``), serve the bundle, yield its base URL; stop it after.

    Args:
        options: What to serve.
        host: HTTP host of Ray Serve's proxy (on a cluster where Serve already runs, its settings stay).
        port: HTTP port.
        address: A running Ray cluster (``auto``, ``HOST:6379``); None starts a local one.
        num_cpus: CPUs of a local cluster (None: all).
        name: The Serve application's name (one per served bundle on a cluster).
        route_prefix: Where the application's routes live (``/line1``: ``/line1/predict``, ...).
        exclusive: The cluster serves only this: stop Ray Serve as a whole at the end. Default:
            when this call started Ray. Otherwise only this application is deleted, and other
            applications on the cluster keep serving.

    Yields:
        ``http://host:port`` plus the route prefix (no trailing slash).
    """
    import ray

    if not route_prefix.startswith("/"):
        raise ValueError(f"route_prefix: expected a path starting with '/', got {route_prefix!r}")
    app = build_app(options)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False)
    whole = started_ray if exclusive is None else exclusive
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=name, route_prefix=route_prefix)
        yield f"http://{host}:{port}{route_prefix.rstrip('/')}"
    finally:
        try:
            if whole:
                serve.shutdown()  # type: ignore[no-untyped-call]
            else:
                serve.delete(name)
        finally:
            if started_ray:
                ray.shutdown()
