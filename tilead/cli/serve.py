"""``tilead-serve``: serve a bundle over HTTP on Ray Serve, with dynamic batching (needs ``tilead[ray]``)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from tilead.cli._common import fail_on_errors
from tilead.runtime.backends import names as backend_names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replicas", type=click.IntRange(1, 1024), default=1, show_default=True, help="Predictor replicas.")
@click.option(
    "--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Images per Predictor call."
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(0, 10_000),
    default=10.0,
    show_default=True,
    help="Longest wait for a batch to fill after its first request.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(list(backend_names())), default="auto", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="CPU threads per replica (and the CPUs Ray reserves for it) [cores // replicas].",
)
@click.option("--resize", is_flag=True, help="Resize images of another size (default: refuse them with 422).")
@click.option(
    "--max-body-mb", type=click.FloatRange(0.001, 4096), default=32.0, show_default=True, help="Largest request body."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--ray-address",
    default=None,
    help="Join a running Ray cluster (auto, HEAD:6379) [start a local one]. On exit only this application is "
    "deleted from a joined cluster; a local one is shut down.",
)
@click.option("--name", default="tilead", show_default=True, help="Serve application name (one per bundle).")
@click.option("--route-prefix", default="/", show_default=True, help="Route prefix, e.g. /line1 for /line1/predict.")
def main(
    bundle: Path,
    replicas: int,
    max_batch: int,
    batch_wait_ms: float,
    device: str,
    backend: str,
    threads: int | None,
    resize: bool,
    max_body_mb: float,
    host: str,
    port: int,
    ray_address: str | None,
    name: str,
    route_prefix: str,
) -> None:
    """Serve BUNDLE: POST an encoded image to /predict (?mask=1 for the mask); GET /healthz, /readyz.

    Runs until SIGINT or SIGTERM, then shuts Ray Serve down.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with fail_on_errors():
        import os

        try:
            from tilead.serve.app import ServeOptions, serving
        except ImportError as err:
            raise click.ClickException(f"serving needs Ray Serve: pip install 'tilead[ray]' ({err})") from err

        cores = len(os.sched_getaffinity(0))
        options = ServeOptions(
            bundle=str(bundle.resolve()),
            replicas=replicas,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            device=device,
            threads=threads if threads is not None else max(1, cores // replicas),
            resize=resize,
            max_body_bytes=int(max_body_mb * 2**20),
            backend=backend,
        )
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            click.echo(f"{signal.Signals(signum).name}: shutting down", err=True)
            stop.set()

        import ray

        ray.init(address=ray_address, include_dashboard=False)
        # After ray.init (which sets its own SIGTERM handler in the driver), before the deployment starts:
        # a signal during start-up also ends in serve.shutdown() and ray.shutdown().
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            exclusive = ray_address is None  # a cluster of our own: stop Serve as a whole at the end
            with serving(
                options, host=host, port=port, name=name, route_prefix=route_prefix, exclusive=exclusive
            ) as url:
                click.echo(f"serving:    {bundle} on {url} ({replicas} replica(s), {options.threads} thread(s) each)")
                click.echo(f"routes:     POST {url}/predict[?mask=1]   GET {url}/healthz   GET {url}/readyz")
                click.echo(f"batching:   up to {max_batch} images, waiting at most {batch_wait_ms:g} ms")
                while not stop.wait(0.5):
                    pass
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        click.echo("stopped", err=True)
