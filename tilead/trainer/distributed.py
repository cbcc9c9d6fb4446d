"""Fitting the locations as Ray tasks (``train.backend: ray``), on one machine or a cluster.

Each location still goes through :func:`tilead.trainer.fit.fit_location`
(via the same entry point the ``train.workers`` processes use): the task
reads the run's saved config from the run folder, fits the location with
``train.task_cpus`` torch threads and writes its checkpoint there atomically.
On several nodes the run folder must therefore be on storage every node
mounts at the same path (NFS, a cluster file system), as must the data.

Ray retries a task whose worker process died (``train.max_retries``); a
retried location starts again from its beginning (or from its detector's
progress folder, for detectors that keep one), exactly as ``--resume`` would.
A task that fails with an exception is not retried (a bug or bad data does not
go away by itself): the run stops and names the location. Locations already
done are skipped before any task is submitted, so resume works the same as on
the local backend.

Fault injection for tests (a worker dying mid-location): :mod:`tilead.trainer.faults`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tilead.trainer.config import RunConfig
from tilead.trainer.data import Sample
from tilead.trainer.fit import _fit_worker
from tilead.trainer.run_dir import RunPaths

log = logging.getLogger("tilead.trainer")


def _fit_task(config_path: str, root: str, index: int, samples: list[Sample], threads: int) -> dict[str, Any]:
    return _fit_worker(config_path, root, index, samples, threads)


def fit_ray(
    cfg: RunConfig, paths: RunPaths, todo: Sequence[int], fit_samples: Sequence[Sample], *, progress: bool
) -> list[dict[str, Any]]:
    """Fit the locations ``todo`` as Ray tasks; summaries in completion order.

    Joins ``cfg.train.ray_address`` (or the cluster ``RAY_ADDRESS`` names, or
    an already initialized Ray), else starts a local Ray on this machine and
    stops it afterwards.

    Raises:
        RuntimeError: If Ray is not installed, or a location's task failed
            (after its retries, for a dead worker), naming the location.
    """
    try:
        import ray
    except ImportError as err:
        raise RuntimeError(f"train.backend: ray needs Ray: pip install 'tilead[ray]' ({err})") from err

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.train.ray_address, include_dashboard=False)
    try:
        task = ray.remote(num_cpus=cfg.train.task_cpus, max_retries=cfg.train.max_retries, retry_exceptions=False)(
            _fit_task
        )
        samples_ref = ray.put(list(fit_samples))
        names = {}
        pending = []
        for i in todo:
            ref = task.remote(str(paths.config), str(paths.root), i, samples_ref, cfg.train.task_cpus)
            names[ref] = i
            pending.append(ref)
        log.info("ray: %d location tasks submitted (%d CPU(s) each)", len(pending), cfg.train.task_cpus)
        results: list[dict[str, Any]] = []
        bar = tqdm(total=len(pending), desc="locations (ray)", unit="loc", disable=not progress)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        results.append(ray.get(ref))
                    except Exception as err:  # Ray wraps the task's error (RayTaskError, WorkerCrashedError)
                        for other in pending:
                            ray.cancel(other)
                        raise RuntimeError(f"location index {names[ref]}: the Ray task failed: {err}") from err
                    bar.update(1)
        finally:
            bar.close()
        return results
    finally:
        if started:
            ray.shutdown()
