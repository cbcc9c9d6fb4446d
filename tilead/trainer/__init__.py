"""Training (PyTorch): one anomaly model per tile location.

Modules:

* :mod:`~tilead.trainer.config`: the YAML run config (pydantic, strict keys).
* :mod:`~tilead.trainer.data`: MVTec-layout and folder-layout datasets (config, discovery).
* :mod:`~tilead.trainer.images`: decoding images and masks (OpenCV), batched loading.
* :mod:`~tilead.trainer.backbones`: offline pretrained feature extractors.
* :mod:`~tilead.trainer.detectors`: one package per detector family (config section, math, adapter).
* :mod:`~tilead.trainer.components`: the run's backbone, preprocessing, grid and threads.
* :mod:`~tilead.trainer.splits`: fit / validation / test images, a detector's holdout.
* :mod:`~tilead.trainer.tiles`: a location's tiles, cut by the runtime's tile kernel.
* :mod:`~tilead.trainer.fit`: fitting one location; :mod:`~tilead.trainer.ensemble`: every location
  (in process, worker processes, or Ray via :mod:`~tilead.trainer.distributed`), resumable.
* :mod:`~tilead.trainer.checkpoints`: location checkpoints (resume, loading the models).
* :mod:`~tilead.trainer.inference`: eager PyTorch inference (per-location maps).
* :mod:`~tilead.trainer.validation`: normalization statistics on runtime-merged maps.
* :mod:`~tilead.trainer.metrics`: AUROC, F1, AUPRO (exact, NumPy).
* :mod:`~tilead.trainer.pipeline`: ``train``; :mod:`~tilead.trainer.evaluation`: ``evaluate`` over any map
  source (the eager ensemble or a bundle's Predictor), as the CLIs call them.
* :mod:`~tilead.trainer.run`: :class:`~tilead.trainer.run.Run`, a trained run opened (grid, stats, models,
  ``matches(manifest)``); :mod:`~tilead.trainer.run_dir` is the run folder's layout and files.

The trainer cuts tiles with the runtime's tile kernel and merges maps with the
runtime's untile and seam-smoothing kernels, so what is validated is what the
Predictor deploys.
"""
