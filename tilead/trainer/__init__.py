"""Training (PyTorch): one anomaly model per tile location.

Modules:

* :mod:`~tilead.trainer.config`: the YAML run config (pydantic, strict keys).
* :mod:`~tilead.trainer.data`: MVTec-layout and folder-layout datasets (config, discovery).
* :mod:`~tilead.trainer.images`: decoding images and masks (OpenCV), batched loading.
* :mod:`~tilead.trainer.backbones`: offline pretrained feature extractors.
* :mod:`~tilead.trainer.padim`: PaDiM for one location (streaming fit, distance map).
* :mod:`~tilead.trainer.ensemble`: fitting every location (resumable), eager inference.
* :mod:`~tilead.trainer.validation`: normalization statistics on runtime-merged maps.
* :mod:`~tilead.trainer.metrics`: AUROC, F1, AUPRO (exact, NumPy).
* :mod:`~tilead.trainer.pipeline`: ``train`` and ``evaluate``, as the CLIs call them.
* :mod:`~tilead.trainer.run`: :class:`~tilead.trainer.run.Run`, a trained run opened (grid, stats, models,
  ``matches(manifest)``); :mod:`~tilead.trainer.run_dir` is the run folder's layout and files.

The trainer cuts tiles with the runtime's tile kernel and merges maps with the
runtime's untile and seam-smoothing kernels, so what is validated is what the
Predictor deploys.
"""
