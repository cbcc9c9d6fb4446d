"""TensorRT: engine building (``tilead-export --trt``) and the native TensorRT backend of the Predictor.

* :mod:`~tilead.trt.modules`: importing TensorRT (full or lean), the API the
  code relies on, and the one clear error where TensorRT or a GPU is missing.
* :mod:`~tilead.trt.build`: one engine per location from the bundle's ONNX,
  with a shared timing cache, under ``engines/<key>/``.
* :mod:`~tilead.trt.backend`: the device-resident pipeline (the extension's
  ``DevicePipeline``: tile kernel, engines, untile, seams, normalize).

None of this has run on a GPU on the machines tilead is developed on (they have
none); ``tilead-doctor`` checks it on the first machine that has one.
"""
