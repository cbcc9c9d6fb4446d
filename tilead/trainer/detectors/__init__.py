"""Per-location anomaly detectors, one package per family (``padim``, ``patchcore``, ``stfpm``).

* :mod:`~tilead.trainer.detectors.base`: the :class:`~tilead.trainer.detectors.base.Detector` interface,
  its registry (:func:`~tilead.trainer.detectors.base.detector_class`) and checkpoints.
* :mod:`~tilead.trainer.detectors.sections`: the ``model`` config sections' base class and registry
  (torch-free; :mod:`tilead.trainer.config` asks it for a family's section).
* ``<family>/``: ``config`` (its section), ``model`` (its math), ``detector`` (its adapter); found by the
  registries on first use, so a new family is one new package.

This package imports nothing itself, so that loading a config does not import torch.
"""
